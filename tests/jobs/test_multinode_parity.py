"""Issue 13's done-when through gpuflow, with the REAL course modules and TensorFlow on both nodes:
`gpuflow run --up --sandbox --count 2 --down training.cifar10_cnn` trains the one-worker model
exactly (history.csv and best_model.keras ≤ 1e-5 relative), and killing worker 1 mid-run ends
the run `failed` naming node 1 within 60 s, with nothing left on any node.

The reference is the module with a one-worker TF_CONFIG at the same global batch (the custom
loop, whose dropout masks are drawn per global batch), run as a plain process at the same time
as the gpuflow run (most of the cost is TensorFlow's import). Shrunk for CI: --limit 320,
--epochs 2, --batch-size 64 (tests/training/multiworker_helpers.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gpuflow import jobs, procs
from infra.sandbox import in_process_sandbox
from tests.jobs.test_multinode_sandbox import _nothing_left, cli
from tests.training.multiworker_helpers import (
    COMMON, THREADS, assert_same_training, assert_two_worker_metrics, shard_lines, start, steps_per_epoch, wait_all,
)

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow is not installed (pip install 'gpuflow[train]')", allow_module_level=True)

# TensorBoard is not under test here (tests/training/test_multiworker.py's two-worker run lists
# it): off on both sides of every comparison (~13% of a small run's CPU time).
NO_TB = ("--no-tensorboard",)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


def _environment(monkeypatch, tmp_path: Path) -> None:
    """What every sandbox node's job inherits: one thread, a KERAS_HOME of the test's own."""
    for name, value in THREADS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("GPUFLOW_WORKER_TIMEOUT", "600")  # a loaded machine is no lost worker


def _project(tmp_path: Path, monkeypatch) -> Path:
    project = tmp_path / "project"  # no training/ package: gpuflow ships the installed one
    project.mkdir()
    monkeypatch.chdir(project)
    return project


def test_two_sandbox_nodes_train_the_one_worker_cnn_exactly(tmp_path, monkeypatch, capfd, gpuflow_home):
    module = "training.cifar10_cnn"
    _environment(monkeypatch, tmp_path)
    reference = start(module, tmp_path / "reference", 1, extra=NO_TB)  # alongside the gpuflow run
    try:
        _project(tmp_path, monkeypatch)
        with in_process_sandbox():
            code = cli(["run", "--up", "--sandbox", "--count", "2", "--down", "parity", module, "--", *COMMON, *NO_TB])
            captured = capfd.readouterr()
            assert code == 0, captured.err[-3000:]
            [record] = jobs.all_records()
            assert record.status is jobs.RunState.SUCCEEDED and len(record.workers) == 2
            assert _nothing_left(gpuflow_home) == []
            # the cluster is gone; every node's log is still there
            assert cli(["logs", record.run_id, "--all"]) == 0
            logs = capfd.readouterr().out.splitlines()
        wait_all(reference, "the one-worker reference")
    finally:
        for process, _ in reference:
            if process.poll() is None:
                process.kill()
                process.wait()

    local = Path(record.local_dir)
    outputs = local / "outputs"
    assert_same_training(tmp_path / "reference" / "w0", outputs)
    assert_two_worker_metrics(outputs)
    assert sorted(p.name for p in outputs.iterdir()) == [
        "best_model.keras", "history.csv", "metrics.json", "training_curves.png"
    ]
    assert (outputs / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = steps_per_epoch(module)
    for index in (0, 1):
        mine = [line for line in logs if line.startswith(f"[node {index}] ")]
        text = "\n".join(mine)
        assert f"worker {index} of 2" in text and shard_lines(index) in text, text[-2000:]
        assert f"{steps} steps per epoch" in text and "epoch 2/2" in text, text[-2000:]
    manifest = json.loads((local / "manifest.json").read_text())
    workers = manifest["workers"]
    assert [(w["index"], w["chief"]) for w in workers] == [(0, True), (1, False)]
    assert [w["instance_id"] for w in workers] == [w.instance_id for w in record.workers]
    assert len({w["instance_id"] for w in workers}) == 2


def test_killing_tensorflow_worker_1_fails_the_run_naming_node_1_within_60_s(tmp_path, monkeypatch, capfd,
                                                                             gpuflow_home):
    _environment(monkeypatch, tmp_path)
    _project(tmp_path, monkeypatch)
    codes: list[int] = []
    argv = ["run", "--up", "--sandbox", "--count", "2", "--down", "killpair", "training.mnist_mlp", "--",
            *COMMON, "--epochs", "200", *NO_TB]
    with in_process_sandbox():
        runner = threading.Thread(target=lambda: codes.append(cli(argv)))
        runner.start()
        record = None
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and runner.is_alive():  # both workers train
            records = jobs.all_records()
            if records and records[0].workers:
                record = records[0]
                logs = [Path(worker.remote_dir, "job.log") for worker in record.workers]
                if all(log.is_file() and "epoch 1/200" in log.read_text() for log in logs):
                    break
            time.sleep(0.2)
        assert record is not None and len(record.workers) == 2, capfd.readouterr().err[-3000:]
        worker = record.workers[1]
        os.killpg(procs.proven(os.path.join(worker.remote_dir, procs.JOB_RECORD)), signal.SIGKILL)
        runner.join(timeout=60)  # the done-when: the run ends within 60 s of the kill
        ended = not runner.is_alive()
        runner.join(timeout=300)  # (either way, nothing may be left behind by the test)
        captured = capfd.readouterr()
        assert ended, "the run did not end within 60 s of worker 1's death"
        said = captured.err[-3000:]
        assert codes == [137], said
        assert "node 1 failed: its job exited with code 137" in captured.err, said
        # the chief was ended on its node (not by gpuflow's settle): by its peer watch, or — under
        # load, before the watch heard — by its own broken collective (exit 70, the run still names
        # node 1); its log says which (read back with `logs`: the streamed copy may miss a node's last lines)
        assert "stopping the job still running" not in captured.err, said
        [final] = jobs.all_records()
        assert final.status is jobs.RunState.FAILED and final.failure == "node 1 failed: its job exited with code 137"
        assert _nothing_left(gpuflow_home) == []
        assert cli(["logs", final.run_id, "--all"]) == 0
        logs = capfd.readouterr().out
        assert ("[node 0] gpuflow: node 1 failed: its job exited with code 137: ending this worker (node 0)" in logs
                or "[node 0] training: error: worker 0 of 2" in logs and "the run cannot continue" in logs), logs[-3000:]
        assert "[node 1] " in logs and "worker 1 of 2" in logs
