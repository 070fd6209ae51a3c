"""The command line every training module shares: its options, their checks, and the
one place where a :class:`TrainingError` becomes ``training: error: ...`` and an exit code.

Checks that need no TensorFlow (options, ``--data-dir``, ``--output``) run before
TensorFlow is imported, so a typo fails in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from training import distributed
from training.checkpoint import Interrupted, watch_stop_signals
from training.data import DATASETS, check_data_dir
from training.errors import TrainingError

OPTIMIZERS = ("rmsprop", "adam", "sgd")
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (SIGTERM / SIGUSR1 save and exit with Interrupted.exit_code, 75)
DEFAULT_SAVE_EVERY_SECONDS = 600.0


# --------------------------------------------------------------------------- options


class Parser(argparse.ArgumentParser):
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
    save_every_steps: int | None = None
    save_every_seconds: float | None = DEFAULT_SAVE_EVERY_SECONDS
    deterministic: bool = False
    tensorboard: bool = True
    tensorboard_every_steps: int = 50
    tensorboard_histograms: bool = False


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
    parser = Parser(
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
        help="directory for the best model, history.csv, metrics.json, the curves and the resume checkpoint (checkpoint/)",
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
    parser.add_argument(
        "--save-every-steps",
        type=positive_int,
        default=None,
        help="also save the step checkpoint (<output>/checkpoint/) every N training steps "
        "(it is saved at every epoch end, on SIGTERM/SIGUSR1, and every --save-every-seconds)",
    )
    parser.add_argument(
        "--save-every-seconds",
        type=positive_float,
        default=DEFAULT_SAVE_EVERY_SECONDS,
        help="save the step checkpoint when this many seconds have passed since the last save",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="TensorFlow op determinism: with the same --seed, the same weights, resumed or not (slower)",
    )
    parser.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write TensorBoard logs to <output>/tensorboard/ (scalars per epoch and every "
        "--tensorboard-every-steps steps, the graph; `gpuflow tensorboard RUN` serves them)",
    )
    parser.add_argument(
        "--tensorboard-every-steps", type=positive_int, default=50, help="write the training scalars every N steps"
    )
    parser.add_argument(
        "--tensorboard-histograms", action="store_true", help="also write weight histograms each epoch (bigger logs)"
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
        save_every_steps=namespace.save_every_steps,
        save_every_seconds=namespace.save_every_seconds,
        deterministic=namespace.deterministic,
        tensorboard=namespace.tensorboard,
        tensorboard_every_steps=namespace.tensorboard_every_steps,
        tensorboard_histograms=namespace.tensorboard_histograms,
    )
    check_data_dir(options.dataset, options.data_dir)
    # Across workers (TF_CONFIG) only the chief writes --output; the others a scratch directory.
    cluster = distributed.cluster_from_environment()
    if cluster is not None and not cluster.is_chief:
        options = replace(options, output=distributed.worker_output(options.output, cluster))
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
    """The one place where errors become a one-line message and an exit code.

    SIGTERM and SIGUSR1 are watched for the whole run: one that comes before training
    starts is honoured when it starts (a checkpoint, exit 75); one that comes after the
    last epoch lets the run finish (evaluation and outputs take seconds)."""
    try:
        with watch_stop_signals():
            body(argv)
    except distributed.WorkerLost as exc:
        print(f"training: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Interrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return exc.exit_code
    except TrainingError as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "training: interrupted; run the same command with the same --output to resume from the last checkpoint "
            "(SIGTERM saves one first)",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT_CODE
    finally:
        distributed.remove_scratch()
    return 0


def exit_process(code: int):
    """End ``python -m training.<module>`` with ``code``.  After a stop request the
    checkpoint is on disk (fsynced) and the line printed: leave at once rather than wait
    for TensorFlow's teardown (measured here: 14-26 s after the line, the input
    pipeline's threads winding down), which could outlast the supervisor's grace period."""
    if code in (Interrupted.exit_code, distributed.WORKER_LOST_EXIT_CODE):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
