"""The machinery every training module shares: options, outputs, callbacks, fit, metrics.

A module supplies its data (a :class:`training.data.Splits`) and a function that builds
its model; :func:`train_and_evaluate` does the rest the same way for all of them:

* TensorFlow set-up: seed, ``--mixed-precision`` policy, ``--xla`` (``jit_compile``),
  and a ``MirroredStrategy`` when more than one GPU is visible;
* the tf.data pipeline of :mod:`training.pipeline`;
* callbacks: ``ModelCheckpoint`` (best ``val_loss``, ``best_model.keras``),
  ``BackupAndRestore`` (``<output>/backup``: a killed run started again with the same
  ``--output`` continues at the next epoch), ``CSVLogger`` (``history.csv``) and an
  epoch timer;
* the test evaluation of the *best* checkpoint, ``metrics.json`` and
  ``training_curves.png``.

Errors a user can cause are :class:`TrainingError`; :func:`run_cli` is the one place
that turns them into ``training: error: ...`` on stderr and a non-zero exit.
Validation that needs no TensorFlow (options, ``--data-dir``, ``--output``) runs before
TensorFlow is imported, so a typo fails in a fraction of a second.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from training.data import DATASETS, Splits
from training.errors import TrainingError

OPTIMIZERS = ("rmsprop", "adam", "sgd")
BEST_MODEL_FILE = "best_model.keras"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
BACKUP_DIRECTORY = "backup"
VISUALIZATION_DIRECTORY = "visualization"  # training.visualize's pictures, with --visualize
INTERRUPTED_EXIT_CODE = 130


# --------------------------------------------------------------------------- options


class _Parser(argparse.ArgumentParser):
    """argparse that raises TrainingError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D102  (argparse API)
        raise TrainingError(f"{message} (see --help)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """The options every module has (module-specific ones stay on the argparse namespace)."""

    module: str
    dataset: str
    data_dir: Path | None
    epochs: int
    batch_size: int
    output: Path
    seed: int
    limit: int | None
    optimizer: str
    learning_rate: float
    mixed_precision: bool
    xla: bool
    visualize: bool = False


def build_parser(
    module: str,
    description: str,
    *,
    default_dataset: str,
    default_epochs: int,
    default_batch_size: int,
    default_optimizer: str,
    default_learning_rate: float | None,
) -> argparse.ArgumentParser:
    """The common options; a module adds its own to the returned parser."""
    parser = _Parser(
        prog=f"python -m {module}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", choices=DATASETS, default=default_dataset, help="what to train on")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="read cifar10/mnist from the official files here (cifar-10-batches-py/ or cifar-10-python.tar.gz; "
        "mnist.npz) instead of downloading them through keras.datasets",
    )
    parser.add_argument("--epochs", type=positive_int, default=default_epochs)
    parser.add_argument("--batch-size", type=positive_int, default=default_batch_size, help="global batch size")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("outputs") / module.rsplit(".", 1)[-1],
        help="directory for the best model, history.csv, metrics.json, the curves and the resume backup",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds Python, NumPy, TF and the pipeline")
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="keep only the first N train and N test images (smoke runs)"
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=default_optimizer)
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=default_learning_rate,
        help="the optimizer's learning rate (default: the module's)",
    )
    parser.add_argument(
        "--mixed-precision", action="store_true", help="mixed_float16 compute (float32 weights and softmax)"
    )
    parser.add_argument("--xla", action="store_true", help="compile the train step with XLA (jit_compile=True)")
    parser.add_argument(
        "--visualize",
        action="store_true",
        help="at the end, draw what the best model learned into <output>/visualization/ (training.visualize)",
    )
    return parser


def parse_options(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    module: str,
    validate: Callable[[argparse.Namespace], None] | None = None,
):
    """(RunOptions, the full namespace), after the checks that need no TensorFlow.

    ``validate`` checks a module's own options; it runs before ``--output`` is created,
    so a rejected command leaves nothing behind.
    """
    namespace = parser.parse_args(argv)
    if validate is not None:
        validate(namespace)
    options = RunOptions(
        module=module,
        dataset=namespace.dataset,
        data_dir=namespace.data_dir,
        epochs=namespace.epochs,
        batch_size=namespace.batch_size,
        output=namespace.output,
        seed=namespace.seed,
        limit=namespace.limit,
        optimizer=namespace.optimizer,
        learning_rate=namespace.learning_rate if namespace.learning_rate is not None else 0.001,
        mixed_precision=namespace.mixed_precision,
        xla=namespace.xla,
        visualize=namespace.visualize,
    )
    from training.data import check_data_dir

    check_data_dir(options.dataset, options.data_dir)
    prepare_output(options.output)
    return options, namespace


def prepare_output(output: Path) -> Path:
    """Create ``output`` and prove it is writable (before any training time is spent)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TrainingError(f"cannot write to --output {output}: {reason}; pass a writable directory") from exc
    return output


def run_cli(body: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None) -> int:
    """The one place where errors become a one-line message and an exit code."""
    try:
        body(argv)
    except TrainingError as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "training: interrupted; run the same command with the same --output to resume at the next epoch",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT_CODE
    return 0


# --------------------------------------------------------------------------- TensorFlow set-up


def import_tensorflow():
    """(tensorflow, keras), with TensorFlow's C++ info chatter off unless asked for."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    return tf, keras


def configure(options: RunOptions):
    """Seed, precision policy and distribution strategy for one run; returns the strategy."""
    tf, keras = import_tensorflow()
    keras.backend.clear_session()
    keras.utils.set_random_seed(options.seed)
    keras.mixed_precision.set_global_policy("mixed_float16" if options.mixed_precision else "float32")
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def make_optimizer(name: str, learning_rate: float):
    import keras

    classes = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    return classes[name](learning_rate=learning_rate)


def describe_devices() -> list[str]:
    tf, _ = import_tensorflow()
    described = []
    for device in tf.config.list_physical_devices():
        details = {}
        if device.device_type == "GPU":
            try:
                details = tf.config.experimental.get_device_details(device)
            except (ValueError, RuntimeError):
                details = {}
        name = details.get("device_name")
        described.append(f"{device.name} ({name})" if name else device.name)
    return described


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


def _epoch_timer_class():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Adds ``epoch_seconds`` and ``train_seconds`` (without validation) to each epoch's logs."""

        def __init__(self):
            super().__init__()
            self.train_seconds: list[float] = []
            self._epoch_start = 0.0
            self._train_end: float | None = None

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

    return EpochTimer


# --------------------------------------------------------------------------- the run


def train_and_evaluate(
    options: RunOptions,
    splits: Splits,
    build_model: Callable[[tuple[int, ...], int], object],
    *,
    augment: bool = False,
    extra_callbacks: Sequence[object] = (),
    extra_metrics: dict | None = None,
) -> dict:
    """Train ``build_model(input_shape, num_classes)`` on ``splits``; write every output.

    Returns the metrics dict also written to ``metrics.json``.  ``extra_callbacks`` run
    after the backup has been saved each epoch (tests use one to kill a run mid-way).
    """
    started = time.perf_counter()
    output = prepare_output(options.output)
    strategy = configure(options)
    tf, keras = import_tensorflow()
    from training import pipeline

    with strategy.scope():
        model = build_model(splits.image_shape, splits.num_classes)
        model.compile(
            optimizer=make_optimizer(options.optimizer, options.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=bool(options.xla),
        )
    train_data, validation_data, test_data = pipeline.make_splits_datasets(
        splits, batch_size=options.batch_size, seed=options.seed, augment=augment
    )

    best_path = output / BEST_MODEL_FILE
    history_path = output / HISTORY_FILE
    backup_dir = output / BACKUP_DIRECTORY
    resume_epoch = min(read_backup_epoch(backup_dir), options.epochs)
    earlier_rows = reconcile_history(history_path, resume_epoch)
    earlier_losses = [row["val_loss"] for row in earlier_rows if "val_loss" in row]
    if resume_epoch == 0:
        best_path.unlink(missing_ok=True)
    if resume_epoch:
        print(f"training: resuming from the backup in {backup_dir} at epoch {resume_epoch + 1}", flush=True)

    timer = _epoch_timer_class()()
    callbacks = [
        timer,
        keras.callbacks.ModelCheckpoint(
            str(best_path),
            monitor="val_loss",
            save_best_only=True,
            # After a resume, only an epoch better than the best before the kill replaces it.
            initial_value_threshold=min(earlier_losses) if earlier_losses and best_path.exists() else None,
        ),
        keras.callbacks.CSVLogger(str(history_path), append=True),
        keras.callbacks.BackupAndRestore(str(backup_dir)),
        *extra_callbacks,
    ]
    fit_started = time.perf_counter()
    model.fit(
        train_data,
        validation_data=validation_data,
        epochs=options.epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=2,
    )
    fit_seconds = time.perf_counter() - fit_started

    from training.models import load_model

    if not best_path.exists():
        # val_loss was never finite (diverged from the first epoch): keep the last weights.
        model.save(best_path)
    best_model = load_model(best_path)
    test_loss, test_accuracy = best_model.evaluate(test_data, verbose=0)
    history = read_history(history_path)
    train_images = len(splits.x_train)
    session_seconds = sum(timer.train_seconds)
    metrics = {
        "module": options.module,
        "dataset": splits.name,
        "data_source": splits.source,
        "samples": splits.counts(),
        "input_shape": list(splits.image_shape),
        "num_classes": splits.num_classes,
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "best_epoch": _best_epoch(history),
        "epochs_requested": options.epochs,
        "epochs_run": len(history),
        "epochs_this_session": len(timer.train_seconds),
        "resumed_from_epoch": resume_epoch,
        "wall_time_seconds": round(time.perf_counter() - started, 3),
        "fit_seconds": round(fit_seconds, 3),
        "images_per_second": round(train_images * len(timer.train_seconds) / session_seconds, 1)
        if session_seconds
        else None,
        "images_per_second_after_first_epoch": _steady_throughput(train_images, timer.train_seconds),
        "parameter_count": int(best_model.count_params()),
        "trainable_parameter_count": int(sum(int(w.numpy().size) for w in best_model.trainable_weights)),
        "batch_size": options.batch_size,
        "optimizer": options.optimizer,
        "learning_rate": options.learning_rate,
        "augmentation": "random horizontal flip + random translation 0.1 (tf.data map)" if augment else None,
        "mixed_precision": options.mixed_precision,
        "xla": options.xla,
        "seed": options.seed,
        "limit": options.limit,
        "strategy": f"{type(strategy).__name__.lstrip('_')} ({strategy.num_replicas_in_sync} replica(s))",
        "devices": describe_devices(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
        "options": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()},
        "visualization": f"{VISUALIZATION_DIRECTORY}/" if options.visualize else None,
        **(extra_metrics or {}),
    }
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curves(history, output / CURVES_FILE, title=f"{options.module} on {splits.name}")
    print(
        f"training: {splits.name}: test accuracy {test_accuracy:.4f}, test loss {test_loss:.4f} "
        f"(best epoch {metrics['best_epoch']}); outputs in {output}",
        flush=True,
    )
    if options.visualize:
        from training import visualize

        test = visualize.image_set(
            splits.name, splits.source, splits.x_test, splits.y_test, splits.pixel_max, splits.num_classes
        )
        visualize.visualize_model(
            best_model, test, output / VISUALIZATION_DIRECTORY, seed=options.seed, model_name=f"{options.module} best model"
        )
    return metrics


def _best_epoch(history: list[dict[str, float]]) -> int | None:
    """1-based epoch with the lowest val_loss (the one ModelCheckpoint kept)."""
    scored = [(row["val_loss"], int(row["epoch"])) for row in history if "val_loss" in row and row["val_loss"] == row["val_loss"]]
    return min(scored)[1] + 1 if scored else None


def _steady_throughput(train_images: int, train_seconds: list[float]) -> float | None:
    """Images/s without the first epoch of this session (graph tracing, warm-up)."""
    if len(train_seconds) < 2:
        return None
    return round(train_images * (len(train_seconds) - 1) / sum(train_seconds[1:]), 1)


def plot_curves(history: list[dict[str, float]], path: Path, *, title: str) -> None:
    """Loss and accuracy, train and validation, per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    epochs = [int(row["epoch"]) + 1 for row in history]
    figure, (loss_axis, accuracy_axis) = pyplot.subplots(1, 2, figsize=(10, 4))
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + metric) for row in history]
            if any(value is not None for value in values):
                axis.plot(epochs, values, marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
