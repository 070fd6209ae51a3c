"""A repeated `pull` of an unchanged run pulls nothing and says so, although the local
manifest.json is the instance's one completed by gpuflow; a changed remote file — the
manifest too — is pulled again (issue 10, item 8)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gpuflow import jobs
from gpuflow.jobs import RunTarget
from gpuflow.records import Cluster
from gpuflow.transport.local import LocalRunner
from infra.sandbox import in_process_sandbox
from tests.jobs.after_support import cli, make_project, only_record, read_json, sandbox_cluster


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    directory = make_project(tmp_path / "project")
    monkeypatch.chdir(directory)
    return directory


@pytest.fixture
def local_target(tmp_path, project) -> RunTarget:
    base = tmp_path / "instance"

    def connect() -> LocalRunner:
        return LocalRunner(base)

    def push(project_dir: Path) -> None:
        runner = connect()
        try:
            runner.put_bytes((project_dir / "job.py").read_bytes(), f"{runner.base_dir}/project/job.py")
        finally:
            runner.close()

    cluster = Cluster(name="pullbox", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                      price_per_hour=1.0)
    return RunTarget(cluster=cluster, connect=connect, sync_project=push)


def test_pulling_an_unchanged_run_again_fetches_nothing(local_target, project):
    said: list[str] = []
    outcome = jobs.run(local_target, project_dir=project, module=None, args=["python", "job.py", "2"],
                       out=io.BytesIO())
    run_id, local, remote = outcome.record.run_id, Path(outcome.record.local_dir), Path(outcome.record.remote_dir)
    assert set(outcome.pull.fetched) == {"job.log", "manifest.json", "outputs/metrics.json", "outputs/weights.bin"}
    completed = (local / "manifest.json").read_bytes()
    assert json.loads(completed)["exit_code"] == 0  # the local manifest is the completed one...
    assert json.loads((remote / "manifest.json").read_bytes())["exit_code"] is None  # ...not the instance's

    for _again in range(2):
        record, report = jobs.pull(run_id, resolve=lambda name: local_target, say=said.append)
        assert report.fetched == ()
        assert set(report.unchanged) == set(outcome.pull.fetched)
        assert said[-1] == f"pulled 0 file(s), 0 bytes (4 unchanged) into {local}"
    assert (local / "manifest.json").read_bytes() == completed
    assert record.status == "succeeded"


def test_a_changed_remote_file_and_a_changed_remote_manifest_are_pulled_again(local_target, project):
    outcome = jobs.run(local_target, project_dir=project, module=None, args=["python", "job.py", "2"],
                       out=io.BytesIO())
    run_id, local, remote = outcome.record.run_id, Path(outcome.record.local_dir), Path(outcome.record.remote_dir)

    (remote / "outputs" / "metrics.json").write_text('{"lines": 99}')
    _record, report = jobs.pull(run_id, resolve=lambda name: local_target)
    assert report.fetched == ("outputs/metrics.json",)
    assert read_json(local / "outputs" / "metrics.json") == {"lines": 99}

    manifest = read_json(remote / "manifest.json")
    (remote / "manifest.json").write_text(json.dumps({**manifest, "note": "rewritten on the instance"}))
    _record, report = jobs.pull(run_id, resolve=lambda name: local_target)
    assert report.fetched == ("manifest.json",)
    pulled = read_json(local / "manifest.json")
    assert pulled["note"] == "rewritten on the instance" and pulled["exit_code"] == 0  # completed again
    _record, report = jobs.pull(run_id, resolve=lambda name: local_target)
    assert report.fetched == ()

    # A local copy changed by hand is not taken for the instance's: it is pulled (and completed) again.
    (local / "manifest.json").write_text("{}")
    (local / "outputs" / "weights.bin").write_bytes(b"edited")
    _record, report = jobs.pull(run_id, resolve=lambda name: local_target)
    assert sorted(report.fetched) == ["manifest.json", "outputs/weights.bin"]
    assert read_json(local / "manifest.json")["exit_code"] == 0
    assert (local / "outputs" / "weights.bin").read_bytes() == (remote / "outputs" / "weights.bin").read_bytes()


@pytest.mark.slow
def test_the_cli_says_that_a_repeated_pull_found_nothing_new(project, capfd):
    with in_process_sandbox(), sandbox_cluster(project, "pullbox"):
        assert cli(["run", "pullbox", "--", "python", "job.py", "2"]) == 0
        capfd.readouterr()
        record = only_record()
        assert cli(["pull", record.run_id]) == 0
        repeated = capfd.readouterr()
        assert repeated.out.strip() == f"{record.local_dir} (0 new, 4 unchanged; job succeeded)"
        assert f"pulled 0 file(s), 0 bytes (4 unchanged) into {record.local_dir}" in repeated.err
        (Path(record.remote_dir) / "outputs" / "metrics.json").write_text('{"lines": 7}')
        assert cli(["pull", record.run_id]) == 0
        assert capfd.readouterr().out.strip() == f"{record.local_dir} (1 new, 3 unchanged; job succeeded)"
