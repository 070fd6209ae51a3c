"""Every run command after the run's cluster is gone (every demo run, every `run --up --down`):
what was pulled is served from runs/RUN_ID/, and the cluster's absence is named only when
something is missing — in one line that says what and why (issue 10, item 7)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpuflow import clusters, jobs
from gpuflow.errors import ClusterNotFound
from infra.sandbox import in_process_sandbox
from tests.jobs.after_support import cli, error_lines, make_project, only_record, sandbox_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    directory = make_project(tmp_path / "project")
    monkeypatch.chdir(directory)
    return directory


def _no_cluster_talk(err: str) -> None:
    assert "cluster" not in err and "gone" not in err, err


def test_a_finished_run_is_served_from_its_pulled_files_once_its_cluster_is_down(project, capfd):
    with in_process_sandbox():
        assert cli(["run", "--up", "--sandbox", "--down", "gone-box", "--", "python", "job.py", "3", "3"]) == 3
        capfd.readouterr()
        with pytest.raises(ClusterNotFound):
            clusters.get_cluster("gone-box")
        record = only_record()
        run_id, local = record.run_id, Path(record.local_dir)
        log = (local / "job.log").read_bytes()
        assert log == b"line 0\nline 1\nline 2\n"

        assert cli(["logs", run_id]) == 0
        printed = capfd.readouterr()
        assert printed.out.encode() == log
        assert printed.err == ""

        assert cli(["logs", run_id, "-f"]) == 3  # the job's own exit code, as while its cluster lived
        followed = capfd.readouterr()
        assert followed.out.encode() == log
        assert error_lines(followed.err) == [f"gpuflow: error: run {run_id} ended with exit code 3"]

        assert cli(["pull", run_id]) == 0
        pulled = capfd.readouterr()
        assert pulled.out.strip() == f"{local} (0 new, 4 unchanged; job failed(3))"
        _no_cluster_talk(pulled.err)

        assert cli(["stop", run_id]) == 0
        stopped = capfd.readouterr()
        assert stopped.out.strip().startswith(f"run {run_id} had already finished: failed(3) (exit code 3, ended ")
        _no_cluster_talk(stopped.err + stopped.out)

        assert cli(["runs"]) == 0
        assert re.search(rf"^{run_id}\s+gone-box\s+failed\(3\)\s", capfd.readouterr().out, re.MULTILINE)
        assert only_record().status == "failed"  # nothing above turned the finished run into a lost one

        # Only what is missing is named, with why it cannot be pulled again.
        (local / "outputs" / "metrics.json").unlink()
        assert cli(["pull", run_id]) == 4
        missing = capfd.readouterr()
        assert missing.out == ""
        assert missing.err.strip().splitlines() == [
            f"gpuflow: error: run {run_id} failed(3), but outputs/metrics.json is missing from {local} "
            "and cannot be pulled again: its cluster gone-box is gone"
        ]
        assert cli(["logs", run_id]) == 0  # its log is all here: no word about the cluster
        logged = capfd.readouterr()
        assert logged.out.encode() == log and logged.err == ""

        (local / "job.log").write_bytes(b"line 0\n")  # changed since it was pulled: not the job's log
        assert cli(["logs", run_id]) == 4
        changed = capfd.readouterr()
        assert changed.out == "line 0\n"  # what is here is still shown
        assert error_lines(changed.err) == [
            f"gpuflow: error: run {run_id} failed(3), but job.log is missing from {local} "
            "and cannot be pulled again: its cluster gone-box is gone"
        ]
        assert cli(["pull", run_id]) == 4
        assert error_lines(capfd.readouterr().err) == [
            f"gpuflow: error: run {run_id} failed(3), but job.log, outputs/metrics.json are missing from {local} "
            "and cannot be pulled again: its cluster gone-box is gone"
        ]


def _first_line_written(remote: Path) -> None:
    wait_for(lambda: (remote / "job.log").is_file() and (remote / "job.log").read_bytes() == b"line 0\n",
             "the job's first line")


def test_runs_that_were_unfinished_or_pulled_early_when_their_cluster_went(project, capfd):
    """Three runs on one cluster when it goes down: one that ended after its last pull (its
    end is missing), one still running that was pulled (lost, what was pulled is kept),
    one still running never pulled (lost, nothing here)."""
    with in_process_sandbox(), sandbox_cluster(project, "gone-box"):
        for _run in range(3):
            assert cli(["run", "gone-box", "--detach", "--", "python", "job.py", "3", "0", "wait"]) == 0
        ended, pulled, never = sorted(jobs.all_records(), key=lambda record: record.run_id)
        for record in (ended, pulled, never):
            _first_line_written(Path(record.remote_dir))
        assert cli(["pull", ended.run_id]) == 0 and cli(["pull", pulled.run_id]) == 0  # while they run
        (Path(ended.remote_dir) / "go").write_text("")
        wait_for(lambda: (Path(ended.remote_dir) / "exit_code").is_file(), "the job's end")
        assert cli(["runs"]) == 0  # learns that it succeeded (nothing is pulled)
        assert jobs.load_record(ended.run_id).status == "succeeded"
        assert cli(["down", "gone-box", "--yes"]) == 0  # the other two jobs die with their instance
        capfd.readouterr()

        assert cli(["logs", ended.run_id]) == 4
        printed = capfd.readouterr()
        assert printed.out == "line 0\n"  # what is here is served
        assert error_lines(printed.err) == [
            f"gpuflow: error: run {ended.run_id} succeeded, but the files in {ended.local_dir} were not "
            "pulled completely after it ended (its log and outputs may lack their end), and they cannot be pulled "
            "again: its cluster gone-box is gone"
        ]
        assert cli(["pull", ended.run_id]) == 4
        assert error_lines(capfd.readouterr().err) == error_lines(printed.err)
        assert cli(["stop", ended.run_id]) == 0
        assert f"run {ended.run_id} had already finished: succeeded" in capfd.readouterr().out

        assert cli(["logs", pulled.run_id]) == 9
        printed = capfd.readouterr()
        assert printed.out == "line 0\n"
        assert error_lines(printed.err) == [
            f"gpuflow: error: run {pulled.run_id} is lost: its cluster gone-box is gone; only what was pulled "
            f"while it ran is in {pulled.local_dir}"
        ]
        assert cli(["logs", pulled.run_id, "-f"]) == 9
        assert capfd.readouterr().out == "line 0\n"
        assert cli(["pull", pulled.run_id]) == 9
        assert error_lines(capfd.readouterr().err) == error_lines(printed.err)
        assert cli(["stop", pulled.run_id]) == 0
        assert capfd.readouterr().out.strip() == (
            f"run {pulled.run_id} is lost (its cluster gone-box is gone): nothing to stop"
        )

        assert cli(["logs", never.run_id, "-f"]) == 9
        printed = capfd.readouterr()
        assert printed.out == ""
        assert error_lines(printed.err) == [
            f"gpuflow: error: run {never.run_id} is lost: its cluster gone-box is gone; nothing of it was pulled"
        ]

        assert cli(["runs", "--json"]) == 0
        listed = {run["run_id"]: run for run in json.loads(capfd.readouterr().out)}
        assert {run_id: run["status"] for run_id, run in listed.items()} == {
            ended.run_id: "succeeded", pulled.run_id: "lost", never.run_id: "lost"}
        assert listed[never.run_id]["lost_reason"] == "its cluster gone-box is gone"


def _local_target(base: Path, *, alive: bool = True) -> jobs.RunTarget:
    from gpuflow.records import Cluster
    from gpuflow.transport.local import LocalRunner

    def connect() -> LocalRunner:
        return LocalRunner(base)

    def push(project_dir: Path) -> None:
        runner = connect()
        try:
            runner.put_bytes((project_dir / "job.py").read_bytes(), f"{runner.base_dir}/project/job.py")
        finally:
            runner.close()

    cluster = Cluster(name="testbox", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                      price_per_hour=1.0)
    return jobs.RunTarget(cluster=cluster, connect=connect, sync_project=push, instance_alive=lambda: alive)


def test_a_terminated_instance_or_a_vanished_run_directory_is_a_gone_cluster_too(project, tmp_path):
    """Not only a cluster torn down by gpuflow: an instance ended behind its back (the switch,
    the console), or a cluster of the same name that no longer has the run's directory."""
    import io
    import shutil

    from gpuflow.errors import NotFound, RunLost

    live = _local_target(tmp_path / "instance")
    finished = jobs.run(live, project_dir=project, module=None, args=["python", "job.py", "2"], out=io.BytesIO())
    started = jobs.run(live, project_dir=project, module=None, args=["python", "job.py", "2", "0", "wait"],
                       out=io.BytesIO(), detach=True)
    local = Path(finished.record.local_dir)

    shutil.rmtree(finished.record.remote_dir)  # the cluster is up, the run's directory is not
    _record, report = jobs.pull(finished.record.run_id, resolve=lambda name: live)
    assert report.fetched == () and len(report.unchanged) == 4
    (local / "outputs" / "metrics.json").unlink()
    with pytest.raises(NotFound) as missing:
        jobs.pull(finished.record.run_id, resolve=lambda name: live)
    assert missing.value.message == (
        f"run {finished.record.run_id} succeeded, but outputs/metrics.json is missing from {local} and cannot be "
        "pulled again: its run directory is gone from cluster testbox"
    )

    terminated = _local_target(tmp_path / "instance", alive=False)
    printed = io.BytesIO()
    assert jobs.logs(finished.record.run_id, out=printed, resolve=lambda name: terminated) == 0
    assert printed.getvalue() == b"line 0\nline 1\n"
    with pytest.raises(RunLost) as lost:
        jobs.logs(started.record.run_id, out=io.BytesIO(), resolve=lambda name: terminated)
    assert lost.value.message == (
        f"run {started.record.run_id} is lost: its cluster testbox is gone (its instance (cluster testbox) is no "
        "longer running); nothing of it was pulled"
    )
    assert jobs.load_record(started.record.run_id).status == "lost"
    (Path(started.record.remote_dir) / "go").write_text("")  # let the job end (its "instance" is this machine)
