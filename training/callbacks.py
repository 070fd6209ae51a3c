"""The callbacks every module's ``model.fit`` uses, the files they keep in ``--output``, and
the exact resume built on them.

* ``ModelCheckpoint`` keeps the epoch with the lowest ``val_loss`` in ``best_model.keras``
  (the test metrics are measured on it);
* ``CSVLogger`` appends each epoch to ``history.csv``;
* an epoch timer adds ``epoch_seconds`` and ``train_seconds`` to each epoch's logs;
* ``TensorBoard`` writes ``tensorboard/`` (``--tensorboard``, on by default): the scalars per
  epoch and every ``--tensorboard-every-steps`` steps, and the graph;
* the step checkpoint (:mod:`training.checkpoint`) saves ``checkpoint/`` at every epoch
  end, every ``--save-every-steps`` steps, every ``--save-every-seconds`` seconds and on
  SIGTERM / SIGUSR1; a run started again with the same ``--output`` continues at the next
  step of the same epoch (a finished run removes ``checkpoint/``).

:class:`CourseCallbacks` sets them up for one run, including the resume bookkeeping
(the history rows to keep, the best value a resumed run must beat, the state to restore),
runs ``model.fit`` from where the checkpoint stands (:meth:`CourseCallbacks.fit`), and
afterwards loads the best model and reads the history back.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Sequence

from training import checkpoint, distributed
from training.checkpoint import Interrupted, Position

BEST_MODEL_FILE = "best_model.keras"
HISTORY_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"  # under --output: train/ and validation/ event files


class CourseCallbacks:
    """The callbacks of one run into ``options.output`` (``self.keras`` goes to ``model.fit``).

    ``train`` is the run's :class:`training.pipeline.TrainStream`; ``identity`` adds what
    else must match for a checkpoint to be this run's (e.g. the transfer-learning case).
    ``extra`` callbacks run after the checkpoint has been saved each epoch (tests use one
    to kill a run mid-way).
    """

    def __init__(self, options, train, *, identity: dict | None = None, extra: Sequence[object] = ()):
        import keras

        self.options = options
        self.output = Path(options.output)
        self.epochs = options.epochs
        self.steps_per_epoch = train.steps_per_epoch
        self.best_path = self.output / BEST_MODEL_FILE
        self.history_path = self.output / HISTORY_FILE
        self.fingerprint = {
            "module": options.module,
            "dataset": options.dataset,
            "limit": options.limit,
            "samples": len(train.images),
            "batch_size": options.batch_size,
            "steps_per_epoch": train.steps_per_epoch,
            "seed": options.seed,
            "optimizer": options.optimizer,
            "learning_rate": options.learning_rate,
            "mixed_precision": options.mixed_precision,
            "augment": train.augment,
            **(identity or {}),
        }
        self.saved = checkpoint.load(self.output, self.fingerprint)
        if self.saved is None:
            self.position = Position(0, 0)
            self.rows: list[dict[str, float]] = []
            self.resumed_from: tuple = ()
            self.best_path.unlink(missing_ok=True)
            _write_history(self.history_path, [])
        else:
            self.position = self.saved.position
            self.rows = [dict(row) for row in self.saved.history]
            self.resumed_from = (*self.saved.resumed_from, self.position.as_record())
            _write_history(self.history_path, self.rows)
            print(
                f"training: resuming from {checkpoint.checkpoint_dir(self.output)} at epoch {self.position.epoch}, "
                f"step {self.position.step + 1} of {self.steps_per_epoch}",
                flush=True,
            )
        self.resume_epoch = min(self.position.epochs_done, self.epochs)  # finished epochs when this session began
        best = self.saved.best_val_loss if self.saved is not None and self.best_path.exists() else None
        self.timer = epoch_timer()
        self.model_checkpoint = keras.callbacks.ModelCheckpoint(
            str(self.best_path),
            monitor="val_loss",
            save_best_only=True,
            # After a resume, only an epoch better than the best before the stop replaces it.
            initial_value_threshold=best,
        )
        self.step_checkpoint = step_checkpoint(self)
        self.keras = [
            self.timer,
            self.model_checkpoint,
            keras.callbacks.CSVLogger(str(self.history_path), append=True),
            self.step_checkpoint,
            *tensorboard_callbacks(options, self.output),
            *extra,
        ]

    # ----------------------------------------------------------------- fit

    def fit(self, model, train, *, validation_data, verbose: int = 2):
        """``model.fit`` from where the checkpoint stands: the rest of an unfinished epoch
        (its own ``fit`` of ``steps_per_epoch - step`` steps), then the remaining epochs.

        SIGTERM / SIGUSR1 finish the current batch, save and raise :class:`Interrupted`.
        """
        common = {"validation_data": validation_data, "callbacks": self.keras, "shuffle": False, "verbose": verbose}
        epoch, step = self.position.epochs_done, self.position.step
        if hasattr(model.distribute_strategy, "_gpuflow_cluster"):  # TF_CONFIG: across workers
            with checkpoint.watch_stop_signals():
                distributed.fit(self, model, train, validation_data=validation_data, build_state=build_state,
                                verbose=verbose)
            return
        with checkpoint.watch_stop_signals():
            if epoch >= self.epochs:
                self.step_checkpoint.restore_model_only(model)  # nothing left to train
                return
            stream = train.batches(epoch, step)
            build_state(model, stream.element_spec)
            if step > 0:
                model.fit(stream, steps_per_epoch=self.steps_per_epoch - step,
                          initial_epoch=epoch, epochs=epoch + 1, **common)
                epoch += 1
                stream = train.batches(epoch)
            if epoch < self.epochs:
                model.fit(stream, steps_per_epoch=self.steps_per_epoch,
                          initial_epoch=epoch, epochs=self.epochs, **common)

    def save_checkpoint(
        self, model, position: Position, reason: str, epoch_seconds_before: float = 0.0, extra: dict | None = None
    ) -> None:
        state = {
            **position.as_record(),
            "epochs_completed": position.epochs_done,
            "steps_per_epoch": self.steps_per_epoch,
            "global_step": position.epochs_done * self.steps_per_epoch + position.step,
            "epochs_requested": self.epochs,
            "module": self.options.module,
            "reason": reason,
            "saved_at": checkpoint.utc_now(),
            "deterministic": getattr(self.options, "deterministic", False),
            "fingerprint": self.fingerprint,
            # The data state: nothing but (seed, epoch, step) (training.pipeline.TrainStream).
            "data_order": {"seed": self.options.seed, "epoch_order": "stateless permutation of (seed, epoch)",
                           "augmentation": "stateless draws of (seed, epoch, step)", "next_step": position.step},
            "history": self.rows,
            "best_val_loss": checkpoint.finite_or_none(self.model_checkpoint.best),
            "epoch_seconds_before": round(epoch_seconds_before, 6),
            "resumed_from": list(self.resumed_from),
            **(extra or {}),
        }
        checkpoint.save(self.output, state, checkpoint.collect(model))

    def finished(self) -> None:
        """The run is complete (metrics.json written): its checkpoint goes."""
        checkpoint.remove(self.output)

    # ----------------------------------------------------------------- after fit

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


def tensorboard_callbacks(options, output: Path) -> list:
    """Keras' TensorBoard callback into ``<output>/tensorboard/`` (``--tensorboard``, on by
    default): the scalars per epoch and every ``--tensorboard-every-steps`` steps, the graph,
    histograms only with ``--tensorboard-histograms``.  Without the ``tensorboard`` package
    (TensorFlow's summary writers come with it) it says so in one line and trains on."""
    if not getattr(options, "tensorboard", False):
        return []
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        print("training: no TensorBoard logs: the tensorboard package is not installed (pip install tensorboard)",
              flush=True)
        return []
    import keras

    return [
        keras.callbacks.TensorBoard(
            log_dir=str(output / TENSORBOARD_DIR),
            histogram_freq=1 if getattr(options, "tensorboard_histograms", False) else 0,
            write_graph=True,
            update_freq=int(getattr(options, "tensorboard_every_steps", 50)),
        )
    ]


def build_state(model, element_spec) -> None:
    """Create the optimizer's and the metrics' variables before ``fit`` (without a
    distribution strategy Keras would create them while tracing the first step, too late
    to restore them).  Keras' own symbolic build, from the batches' shapes: nothing is
    computed, every run (fresh or resumed) does it the same way."""
    build = getattr(model, "_symbolic_build", None)
    if build is None:  # another Keras: at least the optimizer
        model.optimizer.build(model.trainable_variables)
        return
    with model.distribute_strategy.scope():
        build(data_batch=element_spec)


# --------------------------------------------------------------------------- the step checkpoint


def step_checkpoint(owner: CourseCallbacks):
    """The callback that restores a checkpoint when ``fit`` begins and saves one at each
    epoch end, every N steps / S seconds, and on a stop request (then raises Interrupted)."""
    import keras

    class StepCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.restored = owner.saved is None
            self.epoch = owner.position.epochs_done
            self.step = owner.position.step
            self.last_save = time.monotonic()
            self.carry_seconds = 0.0

        # -- restoring

        def _verified_arrays(self, model, groups):
            arrays = owner.saved.arrays
            directory = checkpoint.checkpoint_dir(owner.output)
            if groups == checkpoint.GROUPS:
                checkpoint.check_fits(model, arrays, directory)
            else:  # the model's own arrays: a finished run's optimizer state is not checked against none
                arrays = {name: array for name, array in arrays.items() if name.split("/", 1)[0] in groups}
                checkpoint.check_fits(_OnlyModel(model), arrays, directory)
            return arrays

        def restore_model_only(self, model):
            if not self.restored:
                arrays = self._verified_arrays(model, ("model",))
                checkpoint.assign(list(model.variables), arrays, "model")
                self.restored = True

        def on_train_begin(self, logs=None):
            if not self.restored:
                # fit has built the model, the optimizer and the metrics by now: all is verified, then assigned.
                arrays = self._verified_arrays(self.model, checkpoint.GROUPS)
                groups = checkpoint.variable_groups(self.model)
                checkpoint.assign(groups["model"], arrays, "model")
                checkpoint.assign(groups["optimizer"], arrays, "optimizer")
                self.restored = True
            self.last_save = time.monotonic()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            resuming = owner.saved is not None and epoch == owner.position.epochs_done and owner.position.step > 0
            self.step = owner.position.step if resuming else 0
            if resuming and not getattr(self, "_metrics_restored", False):
                # fit reset the metrics for this epoch; they continue from the saved partial epoch.
                checkpoint.assign(list(self.model.metrics_variables), owner.saved.arrays, "metrics")
                owner.timer.carry_seconds = owner.saved.epoch_seconds_before
                self._metrics_restored = True
            if checkpoint.stop_requested():
                self._stop(Position(epoch, self.step))

        # -- saving

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step >= owner.steps_per_epoch:
                return  # the epoch end saves (after validation)
            position = Position(self.epoch, self.step)
            global_step = self.epoch * owner.steps_per_epoch + self.step
            every_steps = getattr(owner.options, "save_every_steps", None)
            every_seconds = getattr(owner.options, "save_every_seconds", None)
            if checkpoint.stop_requested():
                self._stop(position)
            elif every_steps and global_step % every_steps == 0:
                self._save(position, f"every {every_steps} steps")
            elif every_seconds and time.monotonic() - self.last_save >= every_seconds:
                self._save(position, f"every {every_seconds:g} seconds")

        def on_epoch_end(self, epoch, logs=None):
            # ModelCheckpoint and CSVLogger have run: history.csv holds this epoch's row.
            owner.rows = [row for row in read_history(owner.history_path) if row.get("epoch", -1) <= epoch]
            position = Position(epoch + 1, 0)
            stop = checkpoint.stop_requested() if epoch + 1 < owner.epochs else None
            # A stop that arrived during the epoch's last batch is saved here: the checkpoint says why it was taken.
            self._save(position, f"stop requested ({stop}) at an epoch's end" if stop else "epoch end")
            if stop:
                raise Interrupted(position.epoch, position.step)

        def _save(self, position: Position, reason: str) -> None:
            partial = 0.0
            if position.step > 0:
                partial = owner.timer.carry_seconds + time.perf_counter() - owner.timer.epoch_start
            owner.save_checkpoint(self.model, position, reason, partial)
            self.last_save = time.monotonic()

        def _stop(self, position: Position):
            self._save(position, f"stop requested ({checkpoint.stop_requested()})")
            raise Interrupted(position.epoch, position.step)

    return StepCheckpoint()


class _OnlyModel:
    """A model seen as its own variables only (checking a checkpoint when nothing is left to train)."""

    def __init__(self, model):
        self.variables = model.variables

    @property
    def optimizer(self):
        return _NoVariables()

    metrics_variables: list = []


class _NoVariables:
    variables: list = []


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
            self.carry_seconds = 0.0  # the part of a resumed epoch trained before the stop

        @property
        def epoch_start(self) -> float:
            return self._epoch_start

        def on_train_begin(self, logs=None):
            self._fit_start = time.perf_counter()

        def on_train_end(self, logs=None):
            self.fit_seconds += time.perf_counter() - self._fit_start

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_start = time.perf_counter()
            self._train_end = None

        def on_test_begin(self, logs=None):
            if self._train_end is None:
                self._train_end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            train_seconds = (self._train_end or now) - self._epoch_start + self.carry_seconds
            self.train_seconds.append(train_seconds)
            if logs is not None:
                logs["epoch_seconds"] = now - self._epoch_start + self.carry_seconds
                logs["train_seconds"] = train_seconds
            self.carry_seconds = 0.0

    return EpochTimer()


# --------------------------------------------------------------------------- history.csv


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """history.csv holding exactly ``rows`` (replaced in one step; none: no file)."""
    if not rows:
        path.unlink(missing_ok=True)
        return
    fields = list(rows[0])
    partial = path.with_name(f".{path.name}.part")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (int(value) if key == "epoch" else value) for key, value in row.items()})
    os.replace(partial, path)


def best_epoch(history: list[dict[str, float]]) -> int | None:
    """1-based epoch with the lowest finite val_loss: the one ModelCheckpoint kept (the
    first of equals, as it saves only on a strictly lower loss); None when there is none."""
    scored = [
        (row["val_loss"], int(row["epoch"])) for row in history if "val_loss" in row and math.isfinite(row["val_loss"])
    ]
    return min(scored)[1] + 1 if scored else None
