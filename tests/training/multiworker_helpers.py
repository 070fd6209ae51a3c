"""Shared by the multi-worker tests (tests/training/test_multiworker.py and the gpuflow-level
oracle tests/jobs/test_multinode_parity.py): the arguments every parity run uses, worker
processes with TF_CONFIG on 127.0.0.1, and the parity assertion (history.csv and the saved
weights, read without TensorFlow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training import saved_outputs
from tests.training.saved_outputs import saved_arrays
from training import distributed

REPOSITORY = Path(__file__).resolve().parents[2]
LIMIT, BATCH = 320, 64
COMMON = ("--dataset", "digits", "--epochs", "2", "--seed", "0", "--deterministic", "--optimizer", "adam",
          "--limit", str(LIMIT), "--batch-size", str(BATCH))
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
RELATIVE = 1e-5
# One thread per process (the 2-core machine); a loaded machine must not cause a false "worker lost".
THREADS = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def steps_per_epoch(module: str) -> int:
    """Training rows of ``--limit LIMIT`` (mnist_mlp keeps 20% for validation, the CNNs 10%) over BATCH."""
    return -(-int(LIMIT * 0.8 if module.endswith("mlp") else LIMIT * 0.9) // BATCH)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start(module: str, output: Path, workers: int, extra=(), environment=None) -> list[tuple[subprocess.Popen, Path]]:
    """``workers`` processes of ``module``, worker i writing to ``output/w<i>`` and logging to ``output/log<i>``."""
    output.mkdir(parents=True, exist_ok=True)
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    started = []
    for index in range(workers):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPOSITORY),
            "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}),
            **THREADS,
            "KERAS_HOME": str(output / "keras-home"),
            "TMPDIR": str(output),  # the non-chief's scratch lands here (and must be gone at the end)
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


def wait_all(processes, what: str, timeout: float = 600) -> None:
    for process, log in processes:
        assert process.wait(timeout=timeout) == 0, f"{what}: {log.read_text()[-3000:]}"


def history(path: Path) -> list[dict]:
    """``path`` (a history.csv) as numbers, its timing columns included."""
    return [{key: float(value) for key, value in row.items()} for row in saved_outputs.history(path.parent, timing=True)]


def assert_same_training(reference: Path, other: Path, epochs: int = 2) -> None:
    """``other`` (an output directory) has ``reference``'s history.csv and best_model.keras weights, ≤ RELATIVE."""
    want, got = history(reference / "history.csv"), history(other / "history.csv")
    assert list(want[0]) == list(got[0])  # the same columns, validation included
    assert {"val_loss", "val_accuracy"} <= set(want[0])
    assert len(want) == len(got) == epochs
    for row_want, row_got in zip(want, got):
        for metric in METRICS:
            assert row_got[metric] == pytest.approx(row_want[metric], rel=RELATIVE), metric
    weights_want, weights_got = saved_arrays(reference / "best_model.keras"), saved_arrays(other / "best_model.keras")
    assert weights_want.keys() == weights_got.keys() and len(weights_want) >= 4
    for name, value in weights_want.items():
        scale = max(float(np.max(np.abs(value))), 1e-12)
        assert float(np.max(np.abs(weights_got[name] - value))) <= RELATIVE * scale, name


def assert_two_worker_metrics(output: Path) -> None:
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["num_workers"] == 2 and "MultiWorkerMirroredStrategy" in metrics["strategy"]
    assert len(metrics["devices_per_worker"]) == 1


def shard_lines(index: int) -> str:
    rows = "0-31" if index == 0 else "32-63"
    return f"shard: rows {rows} of each global batch of {BATCH}"
