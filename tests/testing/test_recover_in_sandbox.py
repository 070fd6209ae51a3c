"""gpuflow_sandbox.run(..., recover=True) (or `recover = true` in the project's gpuflow.toml,
as `gpuflow run` reads it) is `gpuflow run --recover`: interrupted by
gpuflow_sandbox.interrupt(), the run is continued on a relaunched node and ends 0, its
attempts in the manifest; the fixture's teardown check (which fails the test on any
leftover, launch templates included) finds nothing after down().  No TensorFlow: the
stand-in job of tests/jobs/recover_helpers.py, its checkpoint in a store outside the node."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.jobs.recover_helpers import RECOVER_JOB, recover_job_args, step_count, trained
from tests.jobs.spot_helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def gpuflow_project_dir(tmp_path) -> Path:
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "gpuflow.toml").write_text('cluster = "spotnode"\nrecover = true\n')  # as `gpuflow run` reads it
    (project / "recoverjob.py").write_text(RECOVER_JOB)
    return project


def test_an_interrupted_run_with_recover_continues_on_a_relaunched_node(gpuflow_sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLOW_IMDS_POLL_SECONDS", "0.1")
    store = tmp_path / "store"
    store.mkdir()
    first = gpuflow_sandbox.up(spot=True).head.instance_id
    interruptions: list = []

    def interrupt_after_three_steps() -> None:
        wait_until(lambda: step_count(store) >= 3, 60, "three steps")
        interruptions.append(gpuflow_sandbox.interrupt(notice_seconds=1))

    thread = threading.Thread(target=interrupt_after_three_steps, daemon=True)
    thread.start()
    run = gpuflow_sandbox.run(recover_job_args(16, 0.25), env={"STORE": str(store)}, max_restarts=1)  # recover: the toml's
    thread.join(30)

    assert [item.instance_id for item in interruptions] == [first]
    assert run.exit_code == 0, run.log
    assert sorted(set(trained(store))) == list(range(16))  # continued, not started over
    attempts = run.manifest["attempts"]
    assert [attempt["ended"] for attempt in attempts] == ["interrupted", "succeeded"]
    assert attempts[0]["instance_id"] == first and attempts[1]["instance_id"] not in (None, first)
    assert "interrupted: checkpoint saved" in run.log and run.log.rstrip().endswith("finished")
    gpuflow_sandbox.wait_terminated(first, timeout=30)  # by the reclaim or by gpuflow, whichever came first
    assert gpuflow_sandbox.clusters() == ["spotnode"]
    gpuflow_sandbox.down()
    assert gpuflow_sandbox.leftovers() == []


def test_recover_false_wins_over_the_toml_and_its_options_are_then_refused(gpuflow_sandbox):
    from gpuflow.errors import UsageError

    with pytest.raises(UsageError, match="need --recover"):
        gpuflow_sandbox.run("recoverjob.py", recover=False, max_restarts=1)
