"""The pull reads the run's environment probe in one remote command: it waits on the target while
the probe still runs, then answers with its document (was: a read, the wait, and a read again)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gpuflow import jobs
from gpuflow.errors import JobFailed
from gpuflow.jobs import pulling, scripts
from gpuflow.jobs.records import ENVIRONMENT_NAME, MANIFEST_NAME, RunTarget
from tests.jobs.conftest import _push_project, fake_cluster, job_args
from tests.jobs.test_start_round_trips import SLOW_PROBE, CountingRunner


class PathCountingRunner(CountingRunner):
    """Also notes which file each read is of."""

    def read_from(self, remote_path, offset=0, limit=1 << 20):
        self.log.append(f"read_from {Path(remote_path).name}")
        return super(CountingRunner, self).read_from(remote_path, offset, limit)


def test_a_pull_that_waits_for_the_probe_reads_its_document_in_one_command(tmp_path, project, monkeypatch):
    runner = PathCountingRunner(tmp_path / "instance")
    target = RunTarget(cluster=fake_cluster(), connect=lambda: runner,
                       sync_project=lambda directory: _push_project(lambda: runner, directory))
    monkeypatch.setattr(scripts, "ENVIRONMENT_PROBE_PY", SLOW_PROBE)  # still running when the job has ended
    operations: list[list[str]] = []
    real_read = pulling._read_environment

    def read_environment(*arguments, **options):
        before = len(runner.log)
        document = real_read(*arguments, **options)
        operations.append(runner.log[before:])
        return document

    monkeypatch.setattr(pulling, "_read_environment", read_environment)
    outcome = jobs.run(target, project_dir=project, module=None, args=job_args(1), out=io.BytesIO())
    assert operations == [["run_script"]]  # was: a read of environment.json, the wait, and the read again
    manifest = json.loads((Path(outcome.record.local_dir) / MANIFEST_NAME).read_text())
    assert manifest["python"] == "saw exit_code"  # the probe's document, which came after the exit code
    assert (Path(outcome.record.remote_dir) / ENVIRONMENT_NAME).is_file()


def test_without_a_probe_document_the_pull_goes_on_without_one(tmp_path):
    runner = CountingRunner(tmp_path / "instance")
    run_dir = tmp_path / "instance" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    assert pulling._read_environment(runner, str(run_dir)) is None
    (run_dir / ENVIRONMENT_NAME).write_text("not json")
    assert pulling._read_environment(runner, str(run_dir)) is None
    (run_dir / ENVIRONMENT_NAME).write_text('{"python": "3.11.7"}')
    assert pulling._read_environment(runner, str(run_dir)) == {"python": "3.11.7"}
    assert pulling._read_environment(runner, str(tmp_path / "gone")) is None


def test_the_pull_after_the_follow_does_not_read_the_exit_code_again(tmp_path, project, monkeypatch):
    runner = PathCountingRunner(tmp_path / "instance")
    target = RunTarget(cluster=fake_cluster(), connect=lambda: runner,
                       sync_project=lambda directory: _push_project(lambda: runner, directory))
    pulled: list[list[str]] = []
    real_pull = pulling.pull_run

    def pull_run(*arguments, **options):
        before = len(runner.log)
        try:
            return real_pull(*arguments, **options)
        finally:
            pulled.append(runner.log[before:])

    monkeypatch.setattr(pulling, "pull_run", pull_run)
    with pytest.raises(JobFailed) as failed:
        jobs.run(target, project_dir=project, module=None, args=job_args(1, 0, 3), out=io.BytesIO())
    assert failed.value.exit_code == 3
    [operations] = pulled
    assert "read_from exit_code" not in operations  # the follow had read it: a read (four SFTP requests) fewer
    record = jobs.load_record(failed.value.run_id)
    assert record.exit_code == 3 and record.status is jobs.RunState.FAILED
    manifest = json.loads((Path(record.local_dir) / MANIFEST_NAME).read_text())
    assert manifest["exit_code"] == 3
