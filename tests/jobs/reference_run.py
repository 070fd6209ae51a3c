"""The uninterrupted reference run that the determinism oracles compare with, trained once per
test session and shared (tests/jobs/test_spot_resume_oracle.py, tests/jobs/test_durable_recovery_oracle.py).

Each oracle interrupts a run of ``training.cifar10_cnn ORACLE_ARGS`` through gpuflow and
resumes it; its final weights and history.csv must be those of the same command run
uninterrupted.  That uninterrupted run is the same for every oracle: it is trained once, as a
plain local process (no gpuflow, no checkpoint restored, ``resumed_from == []``), in a
directory of this pytest run that both xdist workers share (``pytest-N/``, above the workers'
``popen-gwX/``), keyed by the exact argv.  A file lock makes the first test that asks train it
(in the background, alongside its own gpuflow run) and any other wait for it; a run that
fails or is cut short leaves no ``.done`` marker, and the next test trains it afresh.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE = "training.cifar10_cnn"
# digits, first 600 images: 540 train (34 steps of 16 an epoch), 60 validation; 6 epochs; a step
# checkpoint every 8 steps (the oracles interrupt a run once its first one exists).  TensorBoard
# is not under test here: off, on both sides of the comparison.
ORACLE_ARGS = ("--dataset", "digits", "--limit", "600", "--epochs", "6", "--batch-size", "16", "--optimizer", "adam",
               "--seed", "3", "--deterministic", "--save-every-steps", "8", "--no-tensorboard")


class SharedReference:
    """``MODULE args`` run once, uninterrupted, into ``<shared>/reference-<key>/``."""

    def __init__(self, shared: Path, args: tuple[str, ...] = ORACLE_ARGS, module: str = MODULE) -> None:
        key = hashlib.sha256(json.dumps([module, *args]).encode()).hexdigest()[:16]
        self.argv = [sys.executable, "-m", module, *args]
        self.output = shared / f"reference-{key}"
        self.done = shared / f"reference-{key}.done"
        self.log = shared / f"reference-{key}.log"
        self._lock_path = shared / f"reference-{key}.lock"
        self._lock = None
        self._process: subprocess.Popen | None = None

    def start(self) -> "SharedReference":
        """Start training it in the background, unless it is trained or another test trains it."""
        if self.done.exists() or not self._try_lock(blocking=False):
            return self
        if self.done.exists():
            self._unlock()
            return self
        self._spawn()
        return self

    def outputs(self, timeout: float = 600) -> Path:
        """The reference's output directory, once it has trained (here or in another test)."""
        if self._process is None and not self.done.exists():
            self._try_lock(blocking=True)  # another test trains it: wait for its end
            if not self.done.exists():  # it failed or was cut short: train it here
                self._spawn()
        if self._process is not None:
            try:
                code = self._process.wait(timeout=timeout)
                assert code == 0, f"the reference run failed ({code}): {self.log.read_text()[-3000:]}"
                self.done.write_text(json.dumps(self.argv))
            finally:
                self.close()
        self._unlock()
        assert self.done.exists()
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
            self._process = subprocess.Popen([*self.argv, "--output", str(self.output)], cwd=REPOSITORY, env=env,
                                             stdout=log, stderr=subprocess.STDOUT)

    def _try_lock(self, blocking: bool) -> bool:
        if self._lock is not None:
            return True
        handle = self._lock_path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
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
