"""What a finished run leaves in ``--output`` besides the callbacks' files: ``metrics.json``
(written once, complete, atomically) and ``training_curves.png`` (loss and accuracy per
epoch, with the epoch ``best_model.keras`` holds and the test results marked).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

from training.callbacks import CourseCallbacks, best_epoch
from training.cli import RunOptions
from training.data import Splits
from training.session import Session, describe_devices, import_tensorflow

METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
VISUALIZATION_DIRECTORY = "visualization"  # training.visualize's pictures, with --visualize
BEST_EPOCH_MARK = "best-epoch"  # the gid of the curves' marks (tests find them by it)
TEST_MARK = "test-{metric}"


def finish(
    options: RunOptions,
    session: Session,
    splits: Splits,
    best_model,
    callbacks: CourseCallbacks,
    test_loss: float,
    test_accuracy: float,
    *,
    augmentation: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Write metrics.json and training_curves.png, print the one-line summary; returns the metrics."""
    history = callbacks.history()
    metrics = metrics_record(
        options, session, splits, best_model, callbacks, history, test_loss, test_accuracy,
        augmentation=augmentation, extra=extra,
    )
    write_json(options.output / METRICS_FILE, metrics)
    plot_curves(
        history,
        options.output / CURVES_FILE,
        title=f"{options.module} on {splits.name}",
        best_epoch=metrics["best_epoch"],
        test_loss=metrics["test_loss"],
        test_accuracy=metrics["test_accuracy"],
    )
    print(
        f"training: {splits.name}: test accuracy {test_accuracy:.4f}, test loss {test_loss:.4f} "
        f"(best epoch {metrics['best_epoch']}); outputs in {options.output}",
        flush=True,
    )
    callbacks.finished()  # complete: the step checkpoint goes (running again starts over)
    return metrics


def metrics_record(
    options: RunOptions,
    session: Session,
    splits: Splits,
    best_model,
    callbacks: CourseCallbacks,
    history: list[dict[str, float]],
    test_loss: float,
    test_accuracy: float,
    *,
    augmentation: str | None = None,
    extra: dict | None = None,
) -> dict:
    """metrics.json's content: the results, what was run, on what, how fast."""
    tf, keras = import_tensorflow()
    timer = callbacks.timer
    train_images = len(splits.x_train)
    session_seconds = sum(timer.train_seconds)
    return {
        "module": options.module,
        "dataset": splits.name,
        "data_source": splits.source,
        "samples": splits.counts(),
        "input_shape": list(splits.image_shape),
        "num_classes": splits.num_classes,
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "best_epoch": best_epoch(history),
        "epochs_requested": options.epochs,
        "epochs_run": len(history),
        "epochs_this_session": len(timer.train_seconds),
        "resumed_from_epoch": callbacks.resume_epoch,
        "resumed_from": [dict(entry) for entry in callbacks.resumed_from],  # {"epoch", "step"} of each resume
        "deterministic": options.deterministic,
        "wall_time_seconds": round(_elapsed(session), 3),
        "fit_seconds": round(timer.fit_seconds, 3),
        "images_per_second": round(train_images * len(timer.train_seconds) / session_seconds, 1)
        if session_seconds
        else None,
        "images_per_second_after_first_epoch": _steady_throughput(train_images, timer.train_seconds),
        "parameter_count": int(best_model.count_params()),
        "trainable_parameter_count": int(sum(int(w.numpy().size) for w in best_model.trainable_weights)),
        "batch_size": options.batch_size,
        "optimizer": options.optimizer,
        "learning_rate": options.learning_rate,
        "augmentation": augmentation,
        "mixed_precision": options.mixed_precision,
        "xla": options.xla,
        "seed": options.seed,
        "limit": options.limit,
        "strategy": session.describe_strategy(),
        "devices": describe_devices(),
        "num_workers": session.num_workers,  # > 1: MultiWorkerMirroredStrategy (TF_CONFIG); this is the chief's record
        "devices_per_worker": session.devices_per_worker(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
        "options": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()},
        "visualization": f"{VISUALIZATION_DIRECTORY}/" if options.visualize else None,
        **(extra or {}),
    }


def write_json(path: Path, content: dict) -> None:
    """``path`` replaced in one step: a reader sees the old file or the whole new one."""
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)


def _elapsed(session: Session) -> float:
    return time.perf_counter() - session.started


def _steady_throughput(train_images: int, train_seconds: list[float]) -> float | None:
    """Images/s without the first epoch of this session (graph tracing, warm-up)."""
    if len(train_seconds) < 2:
        return None
    return round(train_images * (len(train_seconds) - 1) / sum(train_seconds[1:]), 1)


# --------------------------------------------------------------------------- the curves


def draw_curves(
    history: list[dict[str, float]],
    *,
    title: str,
    best_epoch: int | None,
    test_loss: float | None,
    test_accuracy: float | None,
):
    """The curves as a matplotlib figure (Agg): loss and accuracy, train and validation,
    per epoch; a dashed line at the epoch best_model.keras holds (the last one when
    val_loss was never finite) and a star there at the test loss / accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    epochs = [int(row["epoch"]) + 1 for row in history]
    model_epoch = best_epoch if best_epoch is not None else (epochs[-1] if epochs else None)
    model_note = "best_model.keras" if best_epoch is not None else "best_model.keras = last epoch (no finite val_loss)"
    figure, (loss_axis, accuracy_axis) = pyplot.subplots(1, 2, figsize=(10, 4))
    for axis, metric, test_value in ((loss_axis, "loss", test_loss), (accuracy_axis, "accuracy", test_accuracy)):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + metric) for row in history]
            if any(value is not None for value in values):
                axis.plot(epochs, values, marker="o", label=label)
        if model_epoch is not None:
            axis.axvline(
                model_epoch, color="grey", linestyle="--", linewidth=1, gid=BEST_EPOCH_MARK,
                label=f"epoch {model_epoch}: {model_note}",
            )
            if test_value is not None:
                shown = f"{test_value:.2%}" if metric == "accuracy" else f"{test_value:.4f}"
                axis.plot(
                    [model_epoch], [test_value], marker="*", markersize=14, linestyle="none", color="crimson",
                    gid=TEST_MARK.format(metric=metric), label=f"test {metric} {shown}",
                )
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_curves(history: list[dict[str, float]], path: Path, *, title: str, **marks) -> None:
    """:func:`draw_curves` saved to ``path`` (PNG)."""
    figure = draw_curves(history, title=title, **marks)
    from matplotlib import pyplot  # after draw_curves chose the Agg backend

    figure.savefig(path, dpi=100)
    pyplot.close(figure)
