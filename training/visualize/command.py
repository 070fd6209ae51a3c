"""``python -m training.visualize MODEL.keras``: its options, loading the model and the
test images, and the one-line errors."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from training import cli
from training.data import DATASETS, check_data_dir, load_dataset
from training.errors import TrainingError
from training.outputs import METRICS_FILE, VISUALIZATION_DIRECTORY
from training.session import import_tensorflow
from training.visualize.report import DEFAULT_IMAGES, DEFAULT_STEPS, MODULE, ImageSet, image_set, visualize_model

OUTPUT_DIRECTORY = VISUALIZATION_DIRECTORY


def build_parser():
    parser = cli.Parser(
        prog=f"python -m {MODULE}",
        description="Pictures of what a trained classifier learned, and where it fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="a .keras model saved by a training module (best_model.keras)")
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="the test images to use [default: the dataset in metrics.json beside the model]",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="read cifar10/mnist from the official files here")
    parser.add_argument("--images", type=cli.positive_int, default=DEFAULT_IMAGES, help="test images per picture")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"where the pictures go [default: {OUTPUT_DIRECTORY}/ beside the model]"
    )
    parser.add_argument(
        "--seed",
        type=cli.non_negative_int,
        default=None,
        help="the synthetic data's and the activation maximisation's seed [default: the training seed, or 0]",
    )
    parser.add_argument("--limit", type=cli.positive_int, default=None, help="use only the first N test images")
    parser.add_argument(
        "--steps", type=cli.positive_int, default=DEFAULT_STEPS, help="gradient-ascent steps of the activation maximisation"
    )
    return parser


@dataclass(frozen=True)
class VisualizeOptions:
    model: Path
    dataset: str
    data_dir: Path | None
    images: int
    output: Path
    seed: int
    limit: int | None
    steps: int


def parse_options(argv: Sequence[str] | None) -> VisualizeOptions:
    """The options, after every check that needs no TensorFlow."""
    namespace = build_parser().parse_args(argv)
    model = namespace.model
    if not model.is_file():
        raise TrainingError(f"{model}: no such model file; pass the best_model.keras a training run wrote")
    trained = _training_metrics(model)
    dataset = namespace.dataset or trained.get("dataset")
    if dataset not in DATASETS:
        raise TrainingError(f"no metrics.json beside {model} names its dataset: pass --dataset ({', '.join(DATASETS)})")
    check_data_dir(dataset, namespace.data_dir)
    seed = namespace.seed if namespace.seed is not None else int(trained.get("seed") or 0)
    output = cli.prepare_output(namespace.output or model.parent / OUTPUT_DIRECTORY)
    return VisualizeOptions(
        model=model,
        dataset=dataset,
        data_dir=namespace.data_dir,
        images=namespace.images,
        output=output,
        seed=seed,
        limit=namespace.limit,
        steps=namespace.steps,
    )


def _training_metrics(model: Path) -> dict:
    """metrics.json written beside the model by its training run ({} if there is none)."""
    try:
        metrics = json.loads((model.parent / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


# --------------------------------------------------------------------------- model and data


def load_classifier(path: Path):
    """The saved model, or a one-line error when the file is not a Keras image classifier."""
    from training.layers import load_model  # imports Keras

    try:
        model = load_model(path)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, ... for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrainingError(
            f"cannot load {path} as a Keras model ({reason[:200]}); pass a .keras file saved by a training module"
        ) from exc
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise TrainingError(f"{path} is not an image classifier (one input, one output of class scores)")
    return model


def load_test_images(options: VisualizeOptions, input_shape: tuple[int, ...]) -> ImageSet:
    synthetic_shape = input_shape if len(input_shape) == 3 else (32, 32, 3)
    data = load_dataset(options.dataset, data_dir=options.data_dir, seed=options.seed, synthetic_shape=synthetic_shape)
    return image_set(data.name, data.source, data.x_test, data.y_test, data.pixel_max, data.num_classes, options.limit)


def visualize(options: VisualizeOptions) -> dict:
    """Load the model and the test images, then :func:`visualize_model`."""
    _, keras = import_tensorflow()
    keras.utils.set_random_seed(options.seed)
    model = load_classifier(options.model)
    data = load_test_images(options, tuple(int(size) for size in model.inputs[0].shape[1:]))
    report = visualize_model(
        model, data, options.output, images=options.images, steps=options.steps, seed=options.seed,
        model_name=f"{options.model.parent.name}/{options.model.name}",
    )
    print(f"training: {data.name}: accuracy {report['accuracy']:.4f}; pictures in {options.output}", flush=True)
    return report


def _main(argv: Sequence[str] | None) -> dict:
    return visualize(parse_options(argv))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_cli(_main, argv)
