"""The step-level checkpoint: what a run needs to continue exactly where it stopped.

``<output>/checkpoint/`` holds

* ``state.json`` — small, readable without TensorFlow: ``{"format": 1, "complete": true,
  "epoch": E, "step": S, ...}`` where E is the 1-based epoch in progress (Keras'
  "Epoch E/N") and S the number of its batches already trained (the run continues at
  batch S + 1 of epoch E); also the history rows of the finished epochs, the best
  ``val_loss`` so far (what ``best_model.keras`` holds), the metric state of the
  unfinished epoch, each resume so far, and a fingerprint of the run's configuration;
* ``variables.npz`` — every variable of the model (incl. the dropout seed generators'
  states and BatchNorm statistics), of the optimizer (incl. ``iterations``) and of the
  metrics, with its SHA-256 in ``state.json``.

The data order of an epoch and every augmentation draw are functions of (seed, epoch,
step) (:class:`training.pipeline.TrainStream`), so (epoch, step) is all the data state
there is.  A checkpoint is written into a temporary directory and renamed into place;
the previous one stays until the new one is complete.  Loading verifies everything before
it assigns anything: a damaged or foreign checkpoint is refused with one line.

Stop requests: SIGTERM and SIGUSR1 only set a flag (:func:`watch_stop_signals`); the
training loop finishes the current batch, saves, and raises :class:`Interrupted`, which
:func:`training.cli.run_cli` turns into one line and exit code 75.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import TrainingError

FORMAT = 1
CHECKPOINT_DIRECTORY = "checkpoint"
STATE_FILE = "state.json"
VARIABLES_FILE = "variables.npz"
_TEMPORARY_PREFIX = ".checkpoint.tmp-"
_PREVIOUS = ".checkpoint.previous"
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
INTERRUPTED_EXIT_CODE = 75  # EX_TEMPFAIL: interrupted, resumable
GROUPS = ("model", "optimizer", "metrics")


class Interrupted(Exception):
    """A stop request was honoured: the checkpoint at (epoch, step) is on disk."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self, epoch: int, step: int):
        super().__init__(f"interrupted: checkpoint saved at epoch {epoch} step {step} (resumable)")
        self.epoch = epoch
        self.step = step


# --------------------------------------------------------------------------- stop signals

_stop_requested: list[str] = []


def stop_requested() -> str | None:
    """The name of the first stop signal received inside :func:`watch_stop_signals`, if any."""
    return _stop_requested[0] if _stop_requested else None


def request_stop(name: str = "SIGTERM") -> None:
    _stop_requested.append(name)


@contextlib.contextmanager
def watch_stop_signals():
    """SIGTERM / SIGUSR1 set the stop flag instead of ending the process (main thread only;
    the previous handlers come back afterwards).  A second signal only sets it again, so a
    save in progress is never cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    outermost = not any(isinstance(signal.getsignal(getattr(signal, n)), _Handler) for n in STOP_SIGNALS)
    if outermost:
        _stop_requested.clear()
    try:
        for name in STOP_SIGNALS:
            number = getattr(signal, name)
            previous[number] = signal.signal(number, _Handler(name))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if outermost:
            _stop_requested.clear()


class _Handler:
    def __init__(self, name: str):
        self.name = name

    def __call__(self, signum, frame):
        request_stop(self.name)


# --------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``epochs_done`` finished epochs and ``step`` batches of the next."""

    epochs_done: int
    step: int

    @property
    def epoch(self) -> int:
        """1-based, as Keras prints it ("Epoch E/N")."""
        return self.epochs_done + 1

    def as_record(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}


@dataclass(frozen=True)
class Saved:
    """A verified checkpoint, loaded (arrays included) but not yet applied to a model."""

    position: Position
    steps_per_epoch: int
    history: tuple = ()
    best_val_loss: float | None = None
    epoch_seconds_before: float = 0.0
    resumed_from: tuple = ()
    arrays: dict = field(default_factory=dict, repr=False)


def checkpoint_dir(output: Path) -> Path:
    return Path(output) / CHECKPOINT_DIRECTORY


def recover(output: Path) -> None:
    """Finish or undo a save that a SIGKILL cut short: leftovers of unfinished writes go;
    when the crash came between the two renames, the previous checkpoint comes back."""
    output = Path(output)
    final, previous = checkpoint_dir(output), output / _PREVIOUS
    for leftover in output.glob(f"{_TEMPORARY_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if previous.exists():
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(previous, final)


def read_state(output: Path) -> dict | None:
    """state.json of the checkpoint in ``output`` (None when there is none); refuses a
    damaged one with one line.  Needs no TensorFlow."""
    directory = checkpoint_dir(output)
    if not directory.exists():
        return None
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise _damaged(directory, f"{STATE_FILE} unreadable: {_first_line(exc)}") from exc
    if state.get("format") != FORMAT:
        raise TrainingError(
            f"{directory} has checkpoint format {state.get('format')!r}, this code reads format {FORMAT}: "
            f"delete {directory} to start over"
        )
    if state.get("complete") is not True:
        raise _damaged(directory, "it was never completed")
    return state


def load(output: Path, fingerprint: dict) -> Saved | None:
    """The checkpoint in ``output``, verified (format, completeness, checksum, the run's
    configuration); None when there is none."""
    recover(output)
    state = read_state(output)
    if state is None:
        return None
    directory = checkpoint_dir(output)
    differences = [
        f"{key} {state.get('fingerprint', {}).get(key)!r} there, {value!r} now"
        for key, value in fingerprint.items()
        if state.get("fingerprint", {}).get(key) != value
    ]
    if differences:
        raise TrainingError(
            f"{directory} belongs to a different run ({'; '.join(differences[:3])}): rerun with the same options, "
            f"or delete {directory} (or pass another --output) to start over"
        )
    try:
        raw = (directory / VARIABLES_FILE).read_bytes()
        if hashlib.sha256(raw).hexdigest() != state["variables_sha256"]:
            raise ValueError(f"{VARIABLES_FILE} does not match its checksum")
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        position = Position(int(state["epoch"]) - 1, int(state["step"]))
        saved = Saved(
            position=position,
            steps_per_epoch=int(state["steps_per_epoch"]),
            history=tuple(dict(row) for row in state["history"]),
            best_val_loss=None if state.get("best_val_loss") is None else float(state["best_val_loss"]),
            epoch_seconds_before=float(state.get("epoch_seconds_before", 0.0)),
            resumed_from=tuple(dict(entry) for entry in state.get("resumed_from", [])),
            arrays=arrays,
        )
        if position.epochs_done < 0 or not 0 <= position.step < saved.steps_per_epoch:
            raise ValueError(f"epoch {state['epoch']} step {state['step']} is out of range")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise _damaged(directory, _first_line(exc)) from exc
    return saved


def _damaged(directory: Path, why: str) -> TrainingError:
    return TrainingError(f"the checkpoint in {directory} is damaged ({why}): delete {directory} to start over")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


# --------------------------------------------------------------------------- variables


def variable_groups(model) -> dict[str, list]:
    """Every variable whose value later steps depend on, in a fixed order per group."""
    return {"model": list(model.variables), "optimizer": list(model.optimizer.variables), "metrics": list(model.metrics_variables)}


def collect(model) -> dict[str, np.ndarray]:
    arrays = {}
    for group, variables in variable_groups(model).items():
        for index, variable in enumerate(variables):
            arrays[f"{group}/{index:05d}"] = np.array(variable.numpy())
    return arrays


def check_fits(model, arrays: dict, directory: Path) -> None:
    """Every saved array has a variable of its shape and dtype, and every variable an array."""
    for group, variables in variable_groups(model).items():
        saved = sorted(name for name in arrays if name.startswith(group + "/"))
        if len(saved) != len(variables):
            raise TrainingError(
                f"{directory} belongs to a different model ({len(saved)} {group} variables there, {len(variables)} now): "
                f"delete {directory} (or pass another --output) to start over"
            )
        for name, variable in zip(saved, variables):
            array = arrays[name]
            if tuple(array.shape) != tuple(variable.shape) or np.dtype(array.dtype) != np.dtype(variable.dtype):
                raise TrainingError(
                    f"{directory} belongs to a different model ({variable.path}: {array.shape} {array.dtype} there, "
                    f"{tuple(variable.shape)} {variable.dtype} now): delete {directory} (or pass another --output) to start over"
                )


def assign(variables: list, arrays: dict, group: str) -> None:
    for index, variable in enumerate(variables):
        variable.assign(arrays[f"{group}/{index:05d}"])


# --------------------------------------------------------------------------- saving


def save(output: Path, state: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write the checkpoint: a temporary directory, fsynced, renamed into place; the
    previous checkpoint is removed only once the new one is in place."""
    output = Path(output)
    final, previous = checkpoint_dir(output), output / _PREVIOUS
    temporary = output / f"{_TEMPORARY_PREFIX}{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw = buffer.getvalue()
    _write_synced(temporary / VARIABLES_FILE, raw)
    content = {**state, "format": FORMAT, "complete": True, "variables_sha256": hashlib.sha256(raw).hexdigest()}
    _write_synced(temporary / STATE_FILE, (json.dumps(content, indent=1) + "\n").encode())
    _sync_directory(temporary)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final, previous)
    os.rename(temporary, final)
    _sync_directory(output)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def remove(output: Path) -> None:
    """A finished run's checkpoint goes (running the command again starts over)."""
    shutil.rmtree(checkpoint_dir(output), ignore_errors=True)
    shutil.rmtree(Path(output) / _PREVIOUS, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def finite_or_none(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
