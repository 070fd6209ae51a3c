"""Multi-worker training (training.distributed): the parity oracle and the failure paths.

Real worker processes on 127.0.0.1 with TF_CONFIG (free ports), one thread each.  The
reference is the same module with a one-worker TF_CONFIG at the same global batch: the
same custom loop, so a two-worker run must give the same history.csv and the same
weights (≤ 1e-5 relative: only the all-reduce order differs).  All runs of the parity
oracle start at once and share one fixture (their cost is mostly TensorFlow's import).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training import distributed
from training.errors import TrainingError

REPOSITORY = Path(__file__).resolve().parents[2]
MODULES = ("training.mnist_mlp", "training.cifar10_cnn", "training.cifar10_augmentation")
COMMON = ("--dataset", "digits", "--epochs", "2", "--seed", "0", "--deterministic", "--optimizer", "adam",
          "--limit", "320", "--batch-size", "64")
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
RELATIVE = 1e-5


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(module: str, output: Path, workers: int, extra=(), environment=None) -> list[tuple[subprocess.Popen, Path]]:
    """``workers`` processes of ``module``, worker i writing to ``output/w<i>`` and logging to ``output/log<i>``."""
    output.mkdir(parents=True, exist_ok=True)
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
    started = []
    for index in range(workers):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPOSITORY),
            "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}),
            "TF_NUM_INTRAOP_THREADS": "1",
            "TF_NUM_INTEROP_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "KERAS_HOME": str(output / "keras-home"),
            "TMPDIR": str(output),  # the non-chief's scratch lands here (and must be gone at the end)
            # This shared machine can be so loaded that a step takes minutes: no false "worker lost".
            distributed.TIMEOUT_VARIABLE: "600",
            **(environment or {}),
        }
        log = output / f"log{index}"
        handle = log.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--output", str(output / f"w{index}"), *COMMON, *extra],
            cwd=REPOSITORY, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
        handle.close()
        started.append((process, log))
    return started


def _history(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _weights(path: Path) -> dict[str, np.ndarray]:
    """The weights inside a .keras file (a zip holding model.weights.h5), read without TensorFlow."""
    import h5py

    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as h5:
        found = {}
        h5.visititems(lambda name, item: found.__setitem__(name, np.array(item)) if isinstance(item, h5py.Dataset) else None)
    return found


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """For each module: a one-worker reference and a two-worker run, all nine processes at once."""
    root = tmp_path_factory.mktemp("multiworker")
    runs = {}
    for module in MODULES:
        name = module.rsplit(".", 1)[-1]
        runs[module] = {1: _start(module, root / name / "one", 1), 2: _start(module, root / name / "two", 2)}
    for module in MODULES:
        for count, processes in runs[module].items():
            for process, log in processes:
                assert process.wait(timeout=600) == 0, f"{module} ({count} worker(s)): {log.read_text()[-3000:]}"
    return root, runs


@pytest.mark.parametrize("module", MODULES)
def test_two_workers_give_the_one_worker_history_and_weights(parity_runs, module):
    root, _ = parity_runs
    base = root / module.rsplit(".", 1)[-1]
    one, two = base / "one" / "w0", base / "two" / "w0"
    reference, distributed_history = _history(one / "history.csv"), _history(two / "history.csv")
    assert list(reference[0]) == list(distributed_history[0])  # the same columns, validation included
    assert {"val_loss", "val_accuracy"} <= set(reference[0])
    assert len(reference) == len(distributed_history) == 2
    for row_one, row_two in zip(reference, distributed_history):
        for metric in METRICS:
            assert row_two[metric] == pytest.approx(row_one[metric], rel=RELATIVE), metric
    weights_one, weights_two = _weights(one / "best_model.keras"), _weights(two / "best_model.keras")
    assert weights_one.keys() == weights_two.keys() and len(weights_one) >= 4
    for name, value in weights_one.items():
        scale = max(float(np.max(np.abs(value))), 1e-12)
        assert float(np.max(np.abs(weights_two[name] - value))) <= RELATIVE * scale, name

    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["num_workers"] == 2 and "MultiWorkerMirroredStrategy" in metrics["strategy"]
    assert len(metrics["devices_per_worker"]) == 1
    assert json.loads((one / "metrics.json").read_text())["num_workers"] == 1


@pytest.mark.parametrize("module", MODULES)
def test_only_the_chief_writes_the_output_and_each_log_shows_its_shard(parity_runs, module):
    root, _ = parity_runs
    two = root / module.rsplit(".", 1)[-1] / "two"
    assert sorted(p.name for p in (two / "w0").iterdir()) == [
        "best_model.keras", "history.csv", "metrics.json", "training_curves.png"
    ]
    assert not (two / "w1").exists()  # the non-chief wrote only to its scratch directory...
    assert not list(two.glob("training-worker*"))  # ...which is gone
    steps = -(-int(320 * 0.8 if module.endswith("mlp") else 320 * 0.9) // 64)
    for index, rows in ((0, "0-31"), (1, "32-63")):
        log = (two / f"log{index}").read_text()
        assert f"worker {index} of 2" in log and f"shard: rows {rows} of each global batch of 64" in log
        assert f"{steps} steps per epoch" in log and "epoch 2/2" in log


def _wait_for(log: Path, text: str, processes) -> None:
    while text not in log.read_text():
        for process, process_log in processes:
            assert process.poll() is None, process_log.read_text()[-3000:]
        time.sleep(0.2)


def test_sigterm_on_one_worker_stops_all_at_one_step_and_the_rerun_matches(parity_runs, tmp_path):
    """SIGTERM to worker 1 only: every worker saves at the same step and exits 75; run again,
    the workers restart together from the chief's checkpoint and end as the uninterrupted run."""
    root, _ = parity_runs
    output = tmp_path / "stopped"
    processes = _start("training.mnist_mlp", output, 2)
    (chief, chief_log), (worker, worker_log) = processes
    try:
        _wait_for(worker_log, "shard: rows", processes)  # printed just before the first step
        worker.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=600) for process, _ in processes]
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
    assert codes == [75, 75], chief_log.read_text()[-3000:]
    state = json.loads((output / "w0" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and 1 <= state["step"] and "stop requested" in state["reason"]
    assert not (output / "w1").exists()

    for process, log in _start("training.mnist_mlp", output, 2):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resuming with the chief at epoch 1, step {state['step'] + 1}" in (output / "log1").read_text()
    uninterrupted = root / "mnist_mlp" / "two" / "w0"
    for row_resumed, row_reference in zip(_history(output / "w0" / "history.csv"), _history(uninterrupted / "history.csv")):
        for metric in METRICS:
            assert row_resumed[metric] == pytest.approx(row_reference[metric], rel=RELATIVE), metric
    reference = _weights(uninterrupted / "best_model.keras")
    for name, value in _weights(output / "w0" / "best_model.keras").items():
        assert float(np.max(np.abs(value - reference[name]))) <= RELATIVE * max(float(np.max(np.abs(value))), 1e-12)


def test_a_killed_worker_ends_the_others_with_a_clear_message(tmp_path):
    """SIGKILL on worker 1 mid-run: worker 0 ends within the collective timeout, exit 70, one line."""
    processes = _start("training.mnist_mlp", tmp_path, 2, extra=("--epochs", "200"),
                       environment={distributed.TIMEOUT_VARIABLE: "10"})
    (chief, chief_log), (worker, worker_log) = processes
    try:
        _wait_for(worker_log, "epoch 1/200", processes)
        worker.send_signal(signal.SIGKILL)
        code = chief.wait(timeout=120)
    finally:
        for process in (chief, worker):
            if process.poll() is None:
                process.kill()
                process.wait()
    text = chief_log.read_text()
    assert code == distributed.WORKER_LOST_EXIT_CODE, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("training: error:")]
    assert len(errors) == 1 and "worker 0 of 2" in errors[0] and "another worker died" in errors[0]
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "value",
    ['{"cluster": {"worker": []}}', "not json", '{"cluster": {"worker": ["a:1"]}, "task": {"index": 3}}',
     '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}}'],
)
def test_a_malformed_tf_config_is_refused_with_one_line(value):
    with pytest.raises(TrainingError, match="TF_CONFIG is not a worker cluster"):
        distributed.cluster_from_environment({"TF_CONFIG": value})


def test_the_cluster_and_the_shards():
    cluster = distributed.cluster_from_environment(
        {"TF_CONFIG": '{"cluster": {"worker": ["h:1", "h:2", "h:3"]}, "task": {"type": "worker", "index": 2}}'}
    )
    assert (cluster.num_workers, cluster.index, cluster.is_chief) == (3, 2, False)
    assert distributed.cluster_from_environment({}) is None
    # The shards of a global batch tile it exactly, a partial batch included.
    for count in (64, 29, 3):
        bounds = [distributed.shard_bounds(count, 3, r) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == count
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(2))
