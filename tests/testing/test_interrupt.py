"""gpuflow_sandbox.interrupt(): a user's run on a sandbox node sees a spot notice from the
node's own IMDS, and the node ends as EC2 ends a reclaimed spot instance (no TensorFlow:
the stand-in job of tests/jobs/spot_helpers.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.jobs.spot_helpers import SPOT_JOB, spot_job_args, trained_steps, wait_until


@pytest.fixture
def gpuflow_project_dir(tmp_path) -> Path:
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "gpuflow.toml").write_text('cluster = "spotnode"\n')
    (project / "spotjob.py").write_text(SPOT_JOB)
    return project


def _log_of_running_job(home: Path) -> Path | None:
    found = sorted(home.glob("sandbox/spotnode/i-*/runs/*/job.log"))
    return found[0] if found else None


def test_a_run_sees_the_notice_exits_75_and_the_node_is_reclaimed(gpuflow_sandbox, monkeypatch):
    monkeypatch.setenv("GPUFLOW_IMDS_POLL_SECONDS", "0.1")
    cluster = gpuflow_sandbox.up("spotnode", spot=True)
    instance_id = cluster.head.instance_id
    interruptions = []

    def interrupt_once_training() -> None:
        log = wait_until(lambda: _log_of_running_job(gpuflow_sandbox.home), what="the job's log")
        wait_until(lambda: "epoch 0 step 2" in log.read_text(), what="three steps")
        interruptions.append(gpuflow_sandbox.interrupt(notice_seconds=3))

    interrupter = threading.Thread(target=interrupt_once_training, daemon=True)
    interrupter.start()
    run = gpuflow_sandbox.run(spot_job_args(20, 50, 0.05))
    interrupter.join(timeout=30)

    [interruption] = interruptions
    assert run.exit_code == 75, run.log
    assert "interrupted: checkpoint saved at epoch 0" in run.log
    # The watcher saw the notice the node's IMDS served, wrote it down and signalled the job.
    # The watcher saw the notice the node's IMDS served (interruption.json) and signalled the job.
    assert run.interruption is not None and run.interruption.startswith("spot interruption notice (terminate at ")
    assert interruption.notice == {"action": "terminate", "time": interruption.notice["time"]}
    steps = trained_steps(run.outputs)
    assert len(steps) < 20 * 50 and json.loads((run.outputs / "checkpoint" / "state.json").read_text())["step"] == steps[-1][1]
    # After the notice period the instance is terminated as a spot reclaim, its directory gone.
    instance = gpuflow_sandbox.wait_terminated(instance_id, timeout=30)
    assert instance["StateReason"]["Code"] == "Server.SpotInstanceTermination"
    assert not (gpuflow_sandbox.home / "sandbox" / "spotnode" / instance_id).exists()
    gpuflow_sandbox.down()  # the record, the key pair and the security group; the teardown check finds nothing
