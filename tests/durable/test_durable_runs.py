"""Durable runs end to end on the instance side: the supervisor's sidecar uploads checkpoints
(COMMIT.json last, the two newest kept), the log and the outputs to moto's S3 with the instance
role's credentials; a run started on a node without its checkpoint restores the newest
committed one; failing uploads are loud; logs/pull read S3 when the instance is gone."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from gpuflow import jobs
from gpuflow.durable import run_prefix
from gpuflow.durable.status import DurableState, DurableStatus
from gpuflow.errors import JobInterrupted
from gpuflow.jobs.start import start_run
from tests.durable.durable_helpers import (  # noqa: F401 - fixtures
    BUCKET,
    bucket,
    durable,
    durable_args,
    durable_project,
    keys,
    moto_s3,
    node_target,
    read,
    sha256,
    trained,
)
from tests.infra.cloud import api_calls  # noqa: F401 - fixture
from tests.jobs.spot_helpers import wait_until


def _prefix(run_id: str) -> str:
    from gpuflow.clusters.owner import owner_id

    return run_prefix(owner_id(), run_id)


def _status(run_dir: Path) -> DurableStatus:
    status = DurableStatus.parse((run_dir / "durable.json").read_bytes())
    assert status is not None
    return status


def _exit_code(run_dir: Path) -> int:
    wait_until((run_dir / "exit_code").exists, what="the job's end")
    return int((run_dir / "exit_code").read_text())


def test_a_finished_run_leaves_committed_checkpoints_log_and_outputs_in_s3(durable, durable_project, tmp_path):
    outcome = jobs.run(node_target(tmp_path / "node-a"), project_dir=durable_project, module=None,
                       args=durable_args(20, 5, 0.0, "sync"), out=io.BytesIO())
    assert outcome.exit_code == 0
    record = outcome.record
    run_dir = Path(record.remote_dir)
    prefix = _prefix(record.run_id)
    assert record.durable is not None and record.durable.url == f"s3://{BUCKET}/{prefix}"
    stored = keys(durable, prefix)
    # 3 checkpoints (steps 5, 10, 15) were committed; only the two newest are kept, each complete.
    seqs = sorted({key[len(prefix + "checkpoints/"):].split("/")[0] for key in stored if "/checkpoints/" in key})
    assert seqs == ["000002", "000003"]
    for seq in seqs:
        commit = json.loads(read(durable, f"{prefix}checkpoints/{seq}/COMMIT.json"))
        assert commit["format"] == 1 and commit["attempt"] == 1 and set(commit["files"]) == {"state.json", "variables.npz"}
        for name, entry in commit["files"].items():
            data = read(durable, f"{prefix}checkpoints/{seq}/{name}")
            assert entry == {"size": len(data), "sha256": sha256(data)}
    newest = json.loads(read(durable, f"{prefix}checkpoints/{seqs[-1]}/COMMIT.json"))
    assert (newest["epoch"], newest["step"]) == (1, 15)
    # Outputs at the end, COMMIT.json naming each; the checkpoint is not among them.
    outputs = json.loads(read(durable, f"{prefix}outputs/COMMIT.json"))
    assert set(outputs["files"]) == {"metrics.json", "trained.txt", "curves/loss.csv"}
    for name, entry in outputs["files"].items():
        assert entry["sha256"] == sha256((run_dir / "outputs" / name).read_bytes())
    assert read(durable, f"{prefix}log/job.log") == (run_dir / "job.log").read_bytes()
    assert json.loads(read(durable, f"{prefix}manifest.json"))["run_id"] == record.run_id
    status = _status(run_dir)
    assert status.state is DurableState.FINISHED and status.problem() is None and status.failures == 0
    assert status.checkpoint_bytes and all(size > 8192 for size in status.checkpoint_bytes)
    assert b"gpuflow-durable" not in (run_dir / "job.log").read_bytes()  # nothing failed, nothing said


def test_sigkill_between_checkpoints_loses_only_the_steps_since_the_last_commit(durable, durable_project, tmp_path):
    """The job is SIGKILLed at step 13 (checkpoints at 5 and 10); the run starts again on a new node,
    which has no checkpoint: the sidecar restores step 10 from S3 and the job trains 11..30."""
    first = node_target(tmp_path / "node-a")
    record = jobs.run(first, project_dir=durable_project, module=None, args=durable_args(30, 5, 0.01, "pause=13"),
                      out=io.BytesIO(), detach=True).record
    run_dir = Path(record.remote_dir)
    wait_until(lambda: (run_dir / "outputs" / "trained.txt").exists() and trained(run_dir / "outputs")[-1:] == [13],
               what="step 13")
    wait_until(lambda: (_status(run_dir).committed or None) and _status(run_dir).committed.step == 10,
               what="the commit of step 10")
    os.killpg(int((run_dir / "job.pid").read_text()), signal.SIGKILL)
    assert _exit_code(run_dir) == -9 % 256 or _exit_code(run_dir) == 137

    second = node_target(tmp_path / "node-b")
    runner = second.connect()
    try:
        again = start_run(second, runner, project_dir=durable_project, module=None, args=durable_args(30, 5, 0.01),
                          run_id=record.run_id)
    finally:
        runner.close()
    moved = Path(again.remote_dir)
    assert moved != run_dir and _exit_code(moved) == 0
    assert trained(moved / "outputs") == list(range(11, 31))  # lost: steps 11..13, nothing else
    log = (moved / "job.log").read_text()
    assert "gpuflow-durable: restored checkpoint" in log and "(epoch 1 step 10, attempt 1)" in log
    assert "resumed after step 10" in log
    status = _status(moved)
    assert status.restored is not None and status.restored.step == 10 and status.state is DurableState.FINISHED
    # The log in S3 is the whole run's: the first node's attempt, then this one's.
    whole = read(durable, _prefix(record.run_id) + "log/job.log").decode()
    assert whole.endswith(log) and "step 13\n" in whole[: -len(log)]


@pytest.fixture
def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_uploads_failing_every_time_end_with_one_line_naming_what_was_lost(
        durable, durable_project, tmp_path, monkeypatch, closed_port):
    monkeypatch.setenv("GPUFLOW_S3_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("GPUFLOW_DURABLE_FINAL_SECONDS", "2")
    said: list[str] = []
    with pytest.raises(JobInterrupted) as raised:
        jobs.run(node_target(tmp_path / "node-a"), project_dir=durable_project, module=None,
                 args=durable_args(30, 5, 0.01, "term=7"), out=io.BytesIO(), say=said.append)
    [record] = jobs.all_records()
    run_dir = Path(record.remote_dir)
    message = raised.value.message
    assert "the checkpoint at epoch 1 step 7 was never uploaded to s3://" in message
    assert "no checkpoint of this run is durable" in message and "unreachable" in message
    assert any("the checkpoint at epoch 1 step 7 was never uploaded" in line for line in said)
    log = (run_dir / "job.log").read_text()
    assert "gpuflow-durable: upload of the checkpoint at epoch 1 step 7 failed" in log
    assert "gpuflow-durable: LOST: the checkpoint at epoch 1 step 7 was never uploaded" in log
    status = _status(run_dir)
    assert status.state is DurableState.FAILED and status.lost is not None and status.lost.step == 7
    assert keys(durable) == []
    problem = jobs.load_record(record.run_id).durable_problem
    assert problem is not None and "the checkpoint at epoch 1 step 7 was never uploaded" in problem
    from typer.testing import CliRunner

    from gpuflow.cli import app

    listed = CliRunner().invoke(app, ["runs"])
    assert f"run {record.run_id}: the checkpoint at epoch 1 step 7 was never uploaded" in listed.output


def test_logs_and_pull_read_s3_when_the_instance_is_gone(durable, durable_project, tmp_path, moto_s3, monkeypatch,
                                                         api_calls):
    # api_calls: every S3 call the fallback makes with the user's credentials is checked against
    # infra/iam-policy.json at teardown.
    from gpuflow.durable import fallback

    monkeypatch.setattr(fallback, "sandbox_endpoint", lambda: moto_s3)
    target = node_target(tmp_path / "node-a")
    record = jobs.run(target, project_dir=durable_project, module=None, args=durable_args(12, 5, 0.0),
                      out=io.BytesIO(), detach=True).record
    run_dir = Path(record.remote_dir)
    assert _exit_code(run_dir) == 0
    log = (run_dir / "job.log").read_bytes()
    outputs = {name: (run_dir / "outputs" / name).read_bytes() for name in ("metrics.json", "curves/loss.csv")}
    import shutil

    shutil.rmtree(tmp_path / "node-a")  # the instance is gone, and with it the cluster
    from gpuflow.errors import ClusterNotFound

    def gone(name):
        raise ClusterNotFound(f"no cluster {name}")

    printed = io.BytesIO()
    said: list[str] = []
    jobs.logs(record.run_id, out=printed, resolve=gone, say=said.append)
    assert printed.getvalue() == log and b"finished" in log
    assert any("the log as last uploaded to s3://" in line for line in said)
    _, report = jobs.pull(record.run_id, resolve=gone)
    local = Path(record.local_dir)
    assert {"outputs/metrics.json", "outputs/curves/loss.csv", "job.log", "manifest.json"} <= set(report.fetched)
    for name, data in outputs.items():
        assert (local / "outputs" / name).read_bytes() == data
    assert (local / "job.log").read_bytes() == log
    _, again = jobs.pull(record.run_id, resolve=gone)
    assert "outputs/metrics.json" in again.unchanged
    assert ("s3", "GetObject") in api_calls.gpuflow_calls
