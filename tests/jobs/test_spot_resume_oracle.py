"""The determinism oracle through the whole spot path, with the REAL course module: a
sandbox cluster runs `training.cifar10_cnn --deterministic`; a mock IMDSv2 process on
127.0.0.1 (token required) answers 404 until the job has trained some steps, then
gives a notice; the supervisor's watcher stops the job, which checkpoints and exits 75;
`gpuflow run --resume` finishes it; its final weights and history.csv are those of an
uninterrupted run of the same command (trained alongside as a plain local process, once per
test session: tests/jobs/reference_run.py)."""

from __future__ import annotations

import importlib.util
import json
import signal
import threading
from pathlib import Path

import pytest

from gpuflow import clusters, jobs
from gpuflow.jobs.records import INTERRUPTION_NAME
from infra.sandbox import in_process_sandbox
from tests.jobs.pausing import paused_at_first_checkpoint
from tests.jobs.reference_run import (  # noqa: F401 - fixture
    ORACLE_ARGS, ORACLE_EPOCHS, assert_same_as_reference, oracle_reference,
)
from tests.jobs.spot_helpers import imds  # noqa: F401 - fixture
from tests.waiting import wait_for

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow is not installed (pip install 'gpuflow[train]')", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

# digits, first 600 images: 540 train (34 steps of 16 a epoch), 60 validation; 6 epochs.
# A checkpoint every 8 steps: the first one on the instance is the sign that the job has
# trained some steps, and the notice is given then (well before its 204th step).
MODULE_ARGS = list(ORACLE_ARGS)


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def _notice_once_trained(server, failures: list) -> None:
    """Give the notice once the run's first step checkpoint exists on the instance, with the job
    paused from that checkpoint until the watcher has acted on the notice (its SIGTERM then waits
    for the job, which handles it as it resumes): the job, let go, could train its remaining
    steps before the watcher's next look, and end succeeded instead of interrupted."""
    try:
        [record] = wait_for(jobs.all_records, timeout=120, what="the run's record")
        job = paused_at_first_checkpoint(lambda: Path(record.remote_dir), timeout=120)
        try:
            server.notice()
            wait_for((job.run_dir / INTERRUPTION_NAME).exists, timeout=60, what="the watcher to see the notice")
            wait_for(lambda: job.pending(signal.SIGTERM), timeout=60, what="the watcher's SIGTERM to the job")
        finally:
            job.resume()
    except BaseException as error:  # reported by the test's thread
        failures.append(error)


def test_spot_notice_checkpoint_resume_ends_with_the_uninterrupted_weights(imds, oracle_reference, tmp_path, monkeypatch,
                                                                         capfd):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    project = tmp_path / "oracle-project"  # no training/ package: gpuflow ships the installed one
    project.mkdir()
    monkeypatch.chdir(project)
    failures: list = []
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("spotbox", {"sandbox": True}, project_dir=project))
        try:
            giver = threading.Thread(target=_notice_once_trained, args=(imds, failures), daemon=True)
            giver.start()
            code = cli(["run", "spotbox", "training.cifar10_cnn", "--", *MODULE_ARGS])
            giver.join(timeout=5)
            first = capfd.readouterr()
            assert not failures, failures
            assert code == 75, first.err[-3000:]
            [record] = jobs.all_records()
            local = Path(record.local_dir)
            state = json.loads((local / "outputs" / "checkpoint" / "state.json").read_text())
            epoch, step = state["epoch"], state["step"]
            assert state["reason"].startswith("stop requested (SIGTERM)")
            shown = f"interrupted (resumable at epoch {epoch} step {step})"
            assert f"gpuflow: run {record.run_id} {shown} after a spot interruption notice" in first.err
            assert f"interrupted: checkpoint saved at epoch {epoch} step {step} (resumable)" in first.out + first.err
            assert (epoch, step) < (ORACLE_EPOCHS, 34), "stopped before its last step"
            assert json.loads((Path(record.remote_dir) / "interruption.json").read_text())["notice"]["action"] == (
                "terminate")
            assert not (local / "outputs" / "metrics.json").exists()

            imds.clear_notice()
            assert cli(["run", "--resume", record.run_id]) == 0, capfd.readouterr().err[-3000:]
            resumed = capfd.readouterr()
            assert f"run {record.run_id} succeeded" in resumed.err
            metrics = json.loads((local / "outputs" / "metrics.json").read_text())
            assert metrics["resumed_from"] == [{"epoch": epoch, "step": step}] and metrics["deterministic"] is True
        finally:
            clusters.down("spotbox", sandbox=True)

    # The uninterrupted run of the same command (a plain process, started with the test).
    reference_outputs = oracle_reference.outputs()
    assert json.loads((reference_outputs / "metrics.json").read_text())["resumed_from"] == []

    assert_same_as_reference(local / "outputs", reference_outputs)
    reference_metrics = json.loads((reference_outputs / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(reference_metrics["test_accuracy"], abs=1e-6)
    assert metrics["best_epoch"] == reference_metrics["best_epoch"]
