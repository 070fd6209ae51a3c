"""The uninterrupted reference run that the determinism oracles compare with, trained once per
test session and shared (tests/jobs/test_spot_resume_oracle.py, tests/jobs/test_durable_recovery_oracle.py).

Each oracle interrupts a run of ``training.cifar10_cnn ORACLE_ARGS`` through gpuflow and
resumes it; its final weights and history.csv must be those of the same command run
uninterrupted.  That uninterrupted run is the same for every oracle: it is trained once, as a
plain local process (no gpuflow, no checkpoint restored, ``resumed_from == []``), in a
directory of this pytest run that both xdist workers share (``pytest-N/``, above the workers'
``popen-gwX/``), keyed by the exact argv.  A file lock makes the first test that asks train it
(in the background, alongside its own gpuflow run) and any other wait for it: the training
process itself writes the ``.done`` marker when it succeeds, so a waiting test goes on as soon
as the training ends; one that fails or is cut short (its test ended first) leaves no marker,
lets go of the lock, and the next test that asks trains it afresh.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.saved_outputs import history, saved_arrays

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE = "training.cifar10_cnn"
# digits, first 600 images: 540 train (34 steps of 16 an epoch), 60 validation; 6 epochs; a step
# checkpoint every 8 steps (the oracles interrupt a run once its first one exists).  TensorBoard
# is not under test here: off, on both sides of the comparison.
# GPUFLOW_ORACLE_EPOCHS=12 runs the oracles at the issues' full size (by hand: ~2x the time).
ORACLE_EPOCHS = int(os.environ.get("GPUFLOW_ORACLE_EPOCHS", "6"))
ORACLE_ARGS = ("--dataset", "digits", "--limit", "600", "--epochs", str(ORACLE_EPOCHS), "--batch-size", "16", "--optimizer", "adam",
               "--seed", "3", "--deterministic", "--save-every-steps", "8", "--no-tensorboard")


# ``python -m MODULE ARGS`` (runpy, as -m does), and the marker once it has ended with 0.
_RUN_THEN_MARK = """\
import os, runpy, sys
done, module = sys.argv.pop(1), sys.argv.pop(1)
sys.argv[0] = module
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as stop:
    code = stop.code or 0
if code == 0:
    open(done + ".tmp", "w").close()
    os.replace(done + ".tmp", done)
sys.exit(code)
"""


class SharedReference:
    """``MODULE args`` run once, uninterrupted, into ``<shared>/reference-<key>/``."""

    def __init__(self, shared: Path, args: tuple[str, ...] = ORACLE_ARGS, module: str = MODULE) -> None:
        key = hashlib.sha256(json.dumps([module, *args]).encode()).hexdigest()[:16]
        self.module, self.args = module, tuple(args)
        self.output = shared / f"reference-{key}"
        self.done = shared / f"reference-{key}.done"
        self.log = shared / f"reference-{key}.log"
        self._lock_path = shared / f"reference-{key}.lock"
        self._lock = None
        self._process: subprocess.Popen | None = None

    def start(self) -> "SharedReference":
        """Start training it in the background, unless it is trained or another test trains it."""
        if self.done.exists() or not self._try_lock():
            return self
        if self.done.exists():
            self._unlock()
            return self
        self._spawn()
        return self

    def outputs(self, timeout: float = 600) -> Path:
        """The reference's output directory, once it has trained (here or in another test)."""
        deadline = time.monotonic() + timeout
        while not self.done.exists():
            if self._process is not None:
                code = self._process.poll()
                assert code is None or self.done.exists(), (
                    f"the reference run failed ({code}): {self.log.read_text()[-3000:]}")
            elif self._try_lock() and not self.done.exists():
                self._spawn()  # whoever trained it ended without it: train it here
            assert time.monotonic() < deadline, f"the reference run took over {timeout:g} s"
            time.sleep(0.2)
        if self._process is not None:
            self._process.wait(timeout=60)  # it wrote the marker: it is exiting
        self.close()
        return self.output

    def close(self) -> None:
        """End a reference still training (the test ended first) and let go of the lock."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.wait()
        self._process = None
        self._unlock()

    def _spawn(self) -> None:
        subprocess.run(["rm", "-rf", str(self.output)], check=True)
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "KERAS_HOME": str(self.output.parent / "keras-home"),
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        with self.log.open("w") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _RUN_THEN_MARK, str(self.done), self.module, *self.args, "--output",
                 str(self.output)], cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _try_lock(self) -> bool:
        if self._lock is not None:
            return True
        handle = self._lock_path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock = handle
        return True

    def _unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def shared_directory(request, tmp_path_factory) -> Path:
    """A directory of this pytest run that both xdist workers see (never one of an earlier run)."""
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # a worker's basetemp is pytest-N/popen-gwX
        base = base.parent
    shared = base / "shared-references"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture
def oracle_reference(request, tmp_path_factory):
    """The uninterrupted ``MODULE ORACLE_ARGS`` run, started (or found) now: ``.outputs()`` waits for it."""
    reference = SharedReference(shared_directory(request, tmp_path_factory)).start()
    try:
        yield reference
    finally:
        reference.close()


def assert_same_as_reference(outputs: Path, reference: Path) -> None:
    """``outputs`` (a resumed run's) holds exactly what the uninterrupted ``reference`` holds: every
    array of best_model.keras, the optimizer's state included (≤ 1e-6), and history.csv, each of
    the ORACLE_EPOCHS epochs once."""
    import numpy as np

    got, want = saved_arrays(outputs / "best_model.keras"), saved_arrays(reference / "best_model.keras")
    assert sorted(got) == sorted(want) and any(name.startswith("optimizer/") for name in want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)
    rows = history(outputs)
    assert [int(row["epoch"]) for row in rows] == list(range(ORACLE_EPOCHS))  # Keras counts epochs from 0
    assert rows == history(reference)
