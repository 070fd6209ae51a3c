"""The callbacks every module's ``model.fit`` uses, and the files they keep in ``--output``.

* ``ModelCheckpoint`` keeps the epoch with the lowest ``val_loss`` in ``best_model.keras``
  (the test metrics are measured on it);
* ``BackupAndRestore`` saves each epoch to ``backup/``: a killed run started again with the
  same ``--output`` continues at the next epoch (``fit`` removes ``backup/`` when it ends);
* ``CSVLogger`` appends each epoch to ``history.csv``;
* an epoch timer adds ``epoch_seconds`` and ``train_seconds`` to each epoch's logs.

:class:`CourseCallbacks` sets them up for one run, including the resume bookkeeping
(which history rows to keep, which checkpoint a resumed run must beat), and afterwards
loads the best model and reads the history back.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Sequence

from training.errors import TrainingError

BEST_MODEL_FILE = "best_model.keras"
HISTORY_FILE = "history.csv"
BACKUP_DIRECTORY = "backup"


class CourseCallbacks:
    """The callbacks of one run into ``output`` (``self.keras`` goes to ``model.fit``).

    ``extra`` callbacks run after the backup has been saved each epoch (tests use one to
    kill a run mid-way).
    """

    def __init__(self, output: Path, epochs: int, *, extra: Sequence[object] = ()):
        import keras

        self.best_path = output / BEST_MODEL_FILE
        self.history_path = output / HISTORY_FILE
        backup_dir = output / BACKUP_DIRECTORY
        self.resume_epoch = min(read_backup_epoch(backup_dir), epochs)
        earlier_rows = reconcile_history(self.history_path, self.resume_epoch)
        earlier_losses = [row["val_loss"] for row in earlier_rows if "val_loss" in row]
        if self.resume_epoch == 0:
            self.best_path.unlink(missing_ok=True)
        else:
            print(f"training: resuming from the backup in {backup_dir} at epoch {self.resume_epoch + 1}", flush=True)
        self.timer = epoch_timer()
        self.keras = [
            self.timer,
            keras.callbacks.ModelCheckpoint(
                str(self.best_path),
                monitor="val_loss",
                save_best_only=True,
                # After a resume, only an epoch better than the best before the kill replaces it.
                initial_value_threshold=min(earlier_losses) if earlier_losses and self.best_path.exists() else None,
            ),
            keras.callbacks.CSVLogger(str(self.history_path), append=True),
            keras.callbacks.BackupAndRestore(str(backup_dir)),
            *extra,
        ]

    def best_model(self, model):
        """``best_model.keras``, loaded fresh; when ``val_loss`` was never finite (a run that
        diverged from its first epoch) there is no checkpoint: ``model``'s last weights are saved."""
        from training.layers import load_model

        if not self.best_path.exists():
            model.save(self.best_path)
        return load_model(self.best_path)

    def history(self) -> list[dict[str, float]]:
        """Every epoch of the run, resumed sessions included (history.csv)."""
        return read_history(self.history_path)


# --------------------------------------------------------------------------- the epoch timer


def epoch_timer():
    """An :class:`EpochTimer` (a ``keras.callbacks.Callback``, defined when Keras is imported)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Adds ``epoch_seconds`` and ``train_seconds`` (without validation) to each epoch's
        logs; ``fit_seconds`` is the whole ``fit`` of this session."""

        def __init__(self):
            super().__init__()
            self.train_seconds: list[float] = []
            self.fit_seconds = 0.0
            self._fit_start = 0.0
            self._epoch_start = 0.0
            self._train_end: float | None = None

        def on_train_begin(self, logs=None):
            self._fit_start = time.perf_counter()

        def on_train_end(self, logs=None):
            self.fit_seconds = time.perf_counter() - self._fit_start

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_start = time.perf_counter()
            self._train_end = None

        def on_test_begin(self, logs=None):
            if self._train_end is None:
                self._train_end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            train_seconds = (self._train_end or now) - self._epoch_start
            self.train_seconds.append(train_seconds)
            if logs is not None:
                logs["epoch_seconds"] = now - self._epoch_start
                logs["train_seconds"] = train_seconds

    return EpochTimer()


# --------------------------------------------------------------------------- resume bookkeeping


def read_backup_epoch(backup_dir: Path) -> int:
    """The epoch BackupAndRestore will resume at (0 when there is no backup)."""
    metadata = backup_dir / "training_metadata.json"
    if not metadata.is_file():
        return 0
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{metadata} is damaged ({exc}); delete {backup_dir} to start over") from exc


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    fields = list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (int(value) if key == "epoch" else value) for key, value in row.items()})


def reconcile_history(history_path: Path, resume_epoch: int) -> list[dict[str, float]]:
    """Keep the history rows of the epochs the backup holds; drop the rest.

    A fresh run (no backup) starts a new history; a resumed one keeps epochs
    ``0 .. resume_epoch - 1`` (a run killed after CSVLogger wrote a row but before the
    backup was saved would otherwise list that epoch twice).
    """
    rows = [row for row in read_history(history_path) if row.get("epoch", -1) < resume_epoch]
    _write_history(history_path, rows)
    return rows


def best_epoch(history: list[dict[str, float]]) -> int | None:
    """1-based epoch with the lowest finite val_loss: the one ModelCheckpoint kept (the
    first of equals, as it saves only on a strictly lower loss); None when there is none."""
    scored = [
        (row["val_loss"], int(row["epoch"])) for row in history if "val_loss" in row and math.isfinite(row["val_loss"])
    ]
    return min(scored)[1] + 1 if scored else None
