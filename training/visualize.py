"""Title: See what the network learned — filters, feature maps, activation maximisation,
saliency, CAM / Grad-CAM, confusion matrix and the worst mistakes
Reaches: pictures, not numbers; per-class precision and recall in visualization.json.

The course's part on *looking inside* CNNs, for any classifier these modules save:

* ``filters.png`` — the first convolution's kernels (RGB for colour inputs);
* ``feature_maps.png`` — one test image's activations after every convolution / pooling;
* ``activation_maximization.png`` — inputs that maximise a few filters of the last
  convolution and each class score: gradient ascent from noise around the median pixel,
  with jitter, blur and L2 decay, a fixed seed and a fixed number of steps;
* ``saliency.png`` — |d class score / d input| beside each image;
* ``cam.png`` — where the network looked: true CAM (sum_k w_k A_k of the last feature
  map) for a GlobalAveragePooling2D + Dense head (the transfer-learning models), Grad-CAM
  for the course CNN's Flatten + Dense head, laid over the image with each cell drawn at
  the centre of its receptive field (:func:`geometry_of`);
* ``confusion_matrix.png`` (counts and row-normalised) and ``misclassified.png`` (the
  most confident mistakes);
* ``visualization.json`` — accuracy, per-class precision / recall / F1, the confusion
  matrix, which layer each picture used, the activation-maximisation gains, and why a
  picture was skipped (a model without convolutions has no filters, feature maps or CAM).

Class scores are the logits (the last Dense layer before its softmax). The model is
run in inference mode on [0, 1] images, as every module feeds it.

Model → data → probe → pictures:

    python -m training.visualize runs/cnn/best_model.keras               # dataset from metrics.json beside it
    python -m training.visualize best_model.keras --dataset digits --images 12 --output pictures
    python -m training.cifar10_cnn --dataset digits --visualize          # at the end of a training run

Outputs in ``--output`` (default: ``visualization/`` beside the model): the PNGs above
and visualization.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from training import run
from training.data import DATASETS, check_data_dir, load_dataset
from training.errors import TrainingError

MODULE = "training.visualize"
OUTPUT_DIRECTORY = run.VISUALIZATION_DIRECTORY
REPORT_FILE = "visualization.json"
PICTURES = (
    "filters.png",
    "feature_maps.png",
    "activation_maximization.png",
    "saliency.png",
    "cam.png",
    "confusion_matrix.png",
    "misclassified.png",
)
CONV_PICTURES = ("filters.png", "feature_maps.png", "cam.png")

DEFAULT_IMAGES = 8
DEFAULT_STEPS = 150
MAXIMIZED_FILTERS = 8
MAXIMIZED_CLASSES = 10
MAX_FEATURE_LAYERS = 8
MAX_CHANNELS = 32
MIN_TILE_PIXELS = 16  # small maps and kernels are enlarged (nearest) to at least this

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CONVOLUTIONS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
POOLINGS = ("MaxPooling2D", "AveragePooling2D")


# --------------------------------------------------------------------------- options


def build_parser():
    parser = run._Parser(
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
    parser.add_argument("--images", type=run.positive_int, default=DEFAULT_IMAGES, help="test images per picture")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"where the pictures go [default: {OUTPUT_DIRECTORY}/ beside the model]"
    )
    parser.add_argument(
        "--seed",
        type=run.non_negative_int,
        default=None,
        help="the synthetic data's and the activation maximisation's seed [default: the training seed, or 0]",
    )
    parser.add_argument("--limit", type=run.positive_int, default=None, help="use only the first N test images")
    parser.add_argument(
        "--steps", type=run.positive_int, default=DEFAULT_STEPS, help="gradient-ascent steps of the activation maximisation"
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
    output = run.prepare_output(namespace.output or model.parent / OUTPUT_DIRECTORY)
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
        metrics = json.loads((model.parent / run.METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


# --------------------------------------------------------------------------- model and data


def load_classifier(path: Path):
    """The saved model, or a one-line error when the file is not a Keras image classifier."""
    from training.models import load_model

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


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Test images in [0, 1] (float32, NHWC), their labels and the class names."""

    name: str
    source: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def class_names(dataset: str, num_classes: int) -> tuple[str, ...]:
    if dataset == "cifar10" and num_classes == len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(str(index) for index in range(num_classes))


def image_set(name: str, source: str, x_test, y_test, pixel_max: float, num_classes: int, limit: int | None = None):
    images = np.asarray(x_test[:limit], dtype=np.float32) / float(pixel_max)
    return ImageSet(name, source, images, np.asarray(y_test[:limit], dtype=np.int64), class_names(name, num_classes))


def load_test_images(options: VisualizeOptions, input_shape: tuple[int, ...]) -> ImageSet:
    synthetic_shape = input_shape if len(input_shape) == 3 else (32, 32, 3)
    data = load_dataset(options.dataset, data_dir=options.data_dir, seed=options.seed, synthetic_shape=synthetic_shape)
    return image_set(data.name, data.source, data.x_test, data.y_test, data.pixel_max, data.num_classes, options.limit)


def check_fits(model, data: ImageSet) -> None:
    """The dataset's images and classes must be what the model was trained on."""
    expected = tuple(int(size) for size in model.inputs[0].shape[1:])
    found = tuple(int(size) for size in data.images.shape[1:])
    if expected != found:
        raise TrainingError(
            f"the model takes inputs of shape {expected} but {data.name}'s images are {found}: "
            "pass the --dataset the model was trained on (a --bottleneck head takes features, not images)"
        )
    classes = int(model.outputs[0].shape[-1])
    if classes != len(data.class_names):
        raise TrainingError(
            f"the model has {classes} classes but {data.name} has {len(data.class_names)}: "
            "pass the --dataset the model was trained on"
        )
    if len(data.images) == 0:
        raise TrainingError(f"{data.name} has no test images to look at")


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class Step:
    """One layer call inside the model, nested models inlined: its layer and tensors."""

    layer: object
    inputs: object
    output: object

    @property
    def kind(self) -> str:
        return type(self.layer).__name__


class Probe:
    """A flat Keras model from the image to every layer output that a picture needs.

    Nested models (a transfer model's base and head) are inlined by calling their layers
    again on new symbolic tensors: the layers and weights are the model's own.  Class
    scores are the logits: the last Dense layer's ``x @ W + b``, before its softmax.
    """

    def __init__(self, model):
        import keras

        self.model = model
        inputs = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name="image")
        self.image = inputs
        self.steps: list[Step] = []
        probabilities = _call_inlined(model, inputs, self.steps)
        dense = [step for step in self.steps if step.kind == "Dense"]
        if not dense:
            raise TrainingError("the model has no Dense classifier at its end: cannot compute class scores")
        self.classifier = dense[-1]
        kernel = self.classifier.layer.kernel
        features = keras.ops.cast(self.classifier.inputs, kernel.dtype)
        logits = keras.ops.matmul(features, kernel)
        if self.classifier.layer.use_bias:
            logits = logits + self.classifier.layer.bias
        spatial = [step for step in self.steps if _is_feature_map(step.output)]
        self.convolutions = [step for step in spatial if step.kind in CONVOLUTIONS]
        self.feature_steps = [step for step in spatial if step.kind in CONVOLUTIONS + POOLINGS]
        self.cam_step = self._gap_head_feature_map()
        self.gradcam_step = self._last_convolution_block()
        wanted = {id(step.output): step.output for step in self.feature_steps}
        for step in (self.cam_step, self.gradcam_step):
            if step is not None:
                wanted[id(step.output)] = step.output
        self._index = {key: position for position, key in enumerate(wanted)}
        self.flat = keras.Model(inputs, [*wanted.values(), logits, probabilities], name="probe")

    def _gap_head_feature_map(self) -> Step | None:
        """The map A of a ``A → GlobalAveragePooling2D → (Dropout) → Dense`` head, else None."""
        position = self.steps.index(self.classifier)
        before = position - 1
        while before >= 0 and self.steps[before].kind == "Dropout":
            before -= 1
        if before < 0 or self.steps[before].kind != "GlobalAveragePooling2D":
            return None
        pooling = self.steps[before]
        if getattr(pooling.layer, "keepdims", False) or getattr(pooling.layer, "data_format", "channels_last") != "channels_last":
            return None
        producers = [step for step in self.steps[:before] if step.output is pooling.inputs]
        return producers[-1] if producers else None

    def _last_convolution_block(self) -> Step | None:
        """The last convolution, or the last layer after it that keeps its spatial size
        (its BatchNorm / activation): the map Grad-CAM weighs."""
        if not self.convolutions:
            return None
        last = self.convolutions[-1]
        chosen = last
        for step in self.steps[self.steps.index(last) + 1 :]:
            if not _is_feature_map(step.output) or step.kind in POOLINGS:
                break
            if tuple(step.output.shape[1:3]) == tuple(last.output.shape[1:3]):
                chosen = step
        return chosen

    def run(self, images: np.ndarray, steps: Sequence[Step] = ()):
        """(feature maps of ``steps``, logits, probabilities) as tensors, for gradients."""
        outputs = self.flat(images, training=False)
        maps = [outputs[self._index[id(step.output)]] for step in steps]
        return maps, outputs[-2], outputs[-1]

    def predict(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) as numpy, in batches."""
        logits, probabilities = [], []
        for start in range(0, len(images), batch_size):
            _, batch_logits, batch_probabilities = self.run(images[start : start + batch_size])
            logits.append(np.asarray(batch_logits, dtype=np.float32))
            probabilities.append(np.asarray(batch_probabilities, dtype=np.float32))
        return np.concatenate(logits), np.concatenate(probabilities)

    def maps(self, step: Step, images: np.ndarray) -> np.ndarray:
        (feature_map,), _, _ = self.run(images, [step])
        return np.asarray(feature_map, dtype=np.float32)


def _is_feature_map(tensor) -> bool:
    return hasattr(tensor, "shape") and len(tensor.shape) == 4


def _call_inlined(model, inputs, steps: list[Step]):
    """Call ``model``'s layers on ``inputs``, recording each call; nested models are entered."""
    import keras

    if isinstance(model, keras.Sequential):
        outputs = inputs
        for layer in model.layers:
            outputs = _call_recorded(layer, steps, outputs)
        return outputs

    def operation_fn(operation):
        return lambda *args, **kwargs: _call_recorded(operation, steps, *args, **kwargs)

    # The graph walk Functional.call itself uses (keras.src.ops.function.Function); its
    # operation_fn hook lets a nested model's layers be called one by one.
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def _call_recorded(layer, steps: list[Step], *args, **kwargs):
    import keras

    if isinstance(layer, keras.Model):
        return _call_inlined(layer, args[0], steps)
    kwargs.pop("training", None)  # the probe always runs in inference mode
    output = layer(*args, **kwargs)
    steps.append(Step(layer, args[0] if len(args) == 1 else list(args), output))
    return output


# --------------------------------------------------------------------------- maps: CAM, Grad-CAM, saliency


def class_activation_maps(probe: Probe, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """True CAM: sum_k w[k, c] A_k of the map before GlobalAveragePooling2D (N, h, w).

    Its spatial mean plus the Dense bias is exactly the class's logit.
    """
    feature_maps = probe.maps(probe.cam_step, images)
    weights = np.asarray(probe.classifier.layer.kernel, dtype=np.float32)  # (channels, classes)
    return np.einsum("nhwk,kn->nhw", feature_maps, weights[:, classes])


def grad_cam(probe: Probe, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM: ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of d logit_c / d A_k (N, h, w)."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        (feature_maps,), logits, _ = probe.run(images, [probe.gradcam_step])
        scores = tf.gather(logits, tf.constant(classes), batch_dims=1)
    gradients = tape.gradient(scores, feature_maps)
    alphas = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(alphas * tf.cast(feature_maps, tf.float32), axis=-1)).numpy()


def saliency_maps(probe: Probe, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """|d logit_c / d pixel|, the largest over the colour channels (N, H, W)."""
    import tensorflow as tf

    pixels = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        tape.watch(pixels)
        _, logits, _ = probe.run(pixels)
        scores = tf.gather(logits, tf.constant(classes), batch_dims=1)
    return tf.reduce_max(tf.abs(tape.gradient(scores, pixels)), axis=-1).numpy()


@dataclass(frozen=True)
class Geometry:
    """Where a feature map's cells look: cell (i, j) is centred on image pixel
    (row_scale * i + row_offset, column_scale * j + column_offset), pixel centres at integers."""

    row_scale: float = 1.0
    row_offset: float = 0.0
    column_scale: float = 1.0
    column_offset: float = 0.0


def _axis_after(layer, kind: str, scale: float, offset: float, size_in: int, size_out: int, axis: int):
    """(scale, offset) of an output axis from the input axis's, for one layer."""
    if size_in == size_out and kind not in CONVOLUTIONS + POOLINGS + ("ZeroPadding2D", "Cropping2D"):
        return scale, offset  # element-wise (activation, BatchNorm, Add, ...): same places
    if kind in CONVOLUTIONS + POOLINGS:
        kernel = (layer.kernel_size if kind in CONVOLUTIONS else layer.pool_size)[axis]
        stride = layer.strides[axis]
        dilation = layer.dilation_rate[axis] if kind in CONVOLUTIONS else 1
        span = (kernel - 1) * dilation + 1
        before = 0
        if layer.padding == "same":  # TensorFlow pads the odd pixel after (bottom / right)
            before = max((size_out - 1) * stride + span - size_in, 0) // 2
        return scale * stride, offset + scale * ((span - 1) / 2 - before)
    if kind == "ZeroPadding2D":
        return scale, offset - scale * layer.padding[axis][0]
    if kind == "Cropping2D":
        return scale, offset + scale * layer.cropping[axis][0]
    ratio = size_in / size_out  # Resizing and anything else: cells spread evenly (half-pixel centres)
    return scale * ratio, offset + scale * (ratio - 1) / 2


def geometry_of(probe: Probe, target: Step) -> Geometry:
    """The image positions of ``target``'s cells, through every layer from the input.

    Kernels of even size with "same" padding (the course CNN's 2x2) look down-right of
    where a naive resize would draw them: 3.5 pixels at its last convolution.
    """
    places = {id(probe.image): Geometry()}
    for step in probe.steps:
        source = step.inputs[0] if isinstance(step.inputs, list) else step.inputs
        known = places.get(id(source))
        if known is None or not _is_feature_map(step.output) or not _is_feature_map(source):
            continue
        axes = []
        for axis, (scale, offset) in enumerate(
            ((known.row_scale, known.row_offset), (known.column_scale, known.column_offset))
        ):
            size_in, size_out = int(source.shape[1 + axis]), int(step.output.shape[1 + axis])
            axes.append(_axis_after(step.layer, step.kind, scale, offset, size_in, size_out, axis))
        places[id(step.output)] = Geometry(axes[0][0], axes[0][1], axes[1][0], axes[1][1])
        if step is target:
            break
    found = places.get(id(target.output))
    if found is not None:
        return found
    height, width = (int(size) for size in target.output.shape[1:3])
    image_height, image_width = (int(size) for size in probe.image.shape[1:3])
    rows, columns = image_height / height, image_width / width
    return Geometry(rows, (rows - 1) / 2, columns, (columns - 1) / 2)


def place(maps: np.ndarray, geometry: Geometry, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) maps drawn at image size: each pixel interpolates (bilinear) the cells
    around it by where the cells look; beyond the first / last cell the edge value holds."""

    def weights(pixels: int, cells: int, scale: float, offset: float) -> np.ndarray:
        position = np.clip((np.arange(pixels) - offset) / scale, 0.0, cells - 1)
        below = np.floor(position).astype(int)
        above = np.minimum(below + 1, cells - 1)
        matrix = np.zeros((pixels, cells), dtype=np.float32)
        matrix[np.arange(pixels), below] += 1.0 - (position - below)
        matrix[np.arange(pixels), above] += position - below
        return matrix

    rows = weights(size[0], maps.shape[1], geometry.row_scale, geometry.row_offset)
    columns = weights(size[1], maps.shape[2], geometry.column_scale, geometry.column_offset)
    return np.einsum("ph,nhw,qw->npq", rows, maps.astype(np.float32), columns)


def heat(maps: np.ndarray) -> np.ndarray:
    """Positive part of each map, scaled to a maximum of 1 (the pictures' heat)."""
    positive = np.maximum(maps, 0.0)
    peak = positive.reshape(len(positive), -1).max(axis=1).reshape(-1, *([1] * (positive.ndim - 1)))
    return np.divide(positive, peak, out=np.zeros_like(positive), where=peak > 0)


def localisation_maps(probe: Probe, images: np.ndarray, classes: np.ndarray) -> tuple[str, np.ndarray]:
    """("CAM" or "Grad-CAM", heat maps placed on the image (:func:`place`), in [0, 1])."""
    if probe.cam_step is not None:
        method, step, maps = "CAM", probe.cam_step, class_activation_maps(probe, images, classes)
    else:
        method, step, maps = "Grad-CAM", probe.gradcam_step, grad_cam(probe, images, classes)
    return method, heat(place(maps, geometry_of(probe, step), images.shape[1:3]))


# --------------------------------------------------------------------------- activation maximisation


@dataclass(frozen=True, eq=False)
class Maximized:
    """Gradient-ascent results: the inputs and the objective before and after."""

    images: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def part(self, rows: slice) -> "Maximized":
        return Maximized(self.images[rows], self.start[rows], self.end[rows])


def maximize(
    objective, shape: tuple[int, ...], count: int, *, steps: int, seed: int, centre: float = 0.5,
    step_size: float = 0.05, decay: float = 0.998, blur_every: int = 4,
) -> Maximized:
    """Gradient ascent on ``count`` inputs from the same noise image, ``objective(x) -> (count,)``.

    Regularised as in the usual recipes: a random jitter (roll by up to 1/16 of the side)
    before each step, L2 decay towards mid-grey, a 3x3 blur every ``blur_every`` steps,
    and pixels kept in [0, 1]; the gradient is normalised per image (RMS), so a step
    moves pixels by about ``step_size`` whatever the layer's scale.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    noise = starting_noise(shape, seed, centre)
    images = tf.Variable(np.repeat(noise[None], count, axis=0))
    jitter = max(1, shape[0] // 16)
    blur = tf.constant(np.outer([1, 2, 1], [1, 2, 1]) / 16.0, dtype=tf.float32)[:, :, None, None]
    blur = tf.tile(blur, [1, 1, shape[-1], 1])

    @tf.function
    def ascend(shift, smooth):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(objective(tf.roll(images, shift=shift, axis=(1, 2))))
        gradient = tape.gradient(value, images)
        norm = tf.sqrt(tf.reduce_mean(tf.square(gradient), axis=(1, 2, 3), keepdims=True)) + 1e-8
        updated = centre + (images + step_size * gradient / norm - centre) * decay  # L2 decay towards the centre
        updated = tf.cond(  # explicit, not left to AutoGraph (which needs the source file)
            smooth, lambda: tf.nn.depthwise_conv2d(updated, blur, strides=[1, 1, 1, 1], padding="SAME"), lambda: updated
        )
        images.assign(tf.clip_by_value(updated, 0.0, 1.0))

    start = objective(tf.constant(images)).numpy()
    for step in range(steps):
        shift = tf.constant(rng.integers(-jitter, jitter + 1, size=2), dtype=tf.int32)
        ascend(shift, tf.constant(blur_every > 0 and step % blur_every == blur_every - 1))
    return Maximized(images.numpy(), start, objective(tf.constant(images)).numpy())


def starting_noise(shape: tuple[int, ...], seed: int, centre: float = 0.5) -> np.ndarray:
    """Uniform noise of +-0.05 around ``centre`` (the test images' median pixel), in [0, 1]:
    where every ascent starts."""
    rng = np.random.default_rng([seed, 1])
    return np.clip(centre + 0.1 * (rng.random(shape, dtype=np.float32) - 0.5), 0.0, 1.0).astype(np.float32)


def filter_objective(probe: Probe, step: Step, filters: Sequence[int]):
    """Image k's objective: the mean activation of filter ``filters[k]`` of ``step``."""
    import tensorflow as tf

    columns = tf.constant(list(filters))

    def objective(images):
        (feature_maps,), _, _ = probe.run(images, [step])
        means = tf.reduce_mean(tf.cast(feature_maps, tf.float32), axis=(1, 2))
        return tf.gather(means, columns, batch_dims=1)

    return objective


def stacked_objective(first, first_count: int, second):
    """``first`` on the first ``first_count`` images, ``second`` on the rest (``first`` may be None)."""
    import tensorflow as tf

    if first is None:
        return second
    return lambda images: tf.concat([first(images[:first_count]), second(images[first_count:])], axis=0)


def class_objective(probe: Probe, classes: Sequence[int]):
    """Image k's objective: the logit of class ``classes[k]``."""
    import tensorflow as tf

    columns = tf.constant(list(classes))

    def objective(images):
        _, logits, _ = probe.run(images)
        return tf.gather(tf.cast(logits, tf.float32), columns, batch_dims=1)

    return objective


def selective_filters(probe: Probe, step: Step, images: np.ndarray, count: int, seed: int, centre: float = 0.5) -> list[int]:
    """The filters the test images excite most relative to the starting noise.

    Among the more active half of the filters (on the test images) that the noise does
    not leave at 0 (a ReLU filter at 0 has no gradient to climb), the ``count`` with the
    highest ratio of test-image activation to noise activation: filters that respond to
    the data's structure rather than to any grey image.
    """
    activity = probe.maps(step, images).mean(axis=(0, 1, 2))
    on_noise = probe.maps(step, starting_noise(images.shape[1:], seed, centre)[None]).mean(axis=(0, 1, 2))
    candidates = [index for index in range(len(activity)) if on_noise[index] > 0 and activity[index] >= np.median(activity)]
    ranked = sorted(candidates, key=lambda index: -activity[index] / on_noise[index])
    return sorted(int(index) for index in ranked[:count])


# --------------------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)


def show_image(axis, image: np.ndarray) -> None:
    """An image in [0, 1]: grey with a grey colour map, colour as RGB."""
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axis.imshow(np.clip(image[..., :3], 0.0, 1.0), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def enlarge(tiles: np.ndarray) -> np.ndarray:
    """(n, h, w[, c]) tiles enlarged by an integer factor to at least MIN_TILE_PIXELS (nearest)."""
    factor = max(1, math.ceil(MIN_TILE_PIXELS / max(tiles.shape[1], tiles.shape[2])))
    return np.repeat(np.repeat(tiles, factor, axis=1), factor, axis=2)


def mosaic(tiles: np.ndarray, columns: int, fill: float = np.nan) -> np.ndarray:
    """(n, h, w[, c]) tiles as one image, ``columns`` wide, one ``fill`` pixel between tiles."""
    count, height, width = tiles.shape[:3]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1, *tiles.shape[3:]), fill, dtype=np.float32)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid[row * (height + 1) : row * (height + 1) + height, column * (width + 1) : column * (width + 1) + width] = tile
    return grid


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def _caffe_preprocessing(probe: Probe, before: Step) -> bool:
    """True when the model turns RGB into BGR (ImageNet "caffe" mode) before ``before``."""
    for step in probe.steps[: probe.steps.index(before)]:
        if step.kind == "ImagenetPreprocessing" and getattr(step.layer, "mode", None) == "caffe":
            return True
    return False


def plot_filters(probe: Probe, path: Path, title: str) -> dict:
    """The first Conv2D's kernels: RGB when it reads 3 channels, else a diverging colour map."""
    pyplot = _pyplot()
    first = next((step for step in probe.convolutions if step.kind == "Conv2D"), probe.convolutions[0])
    kernel = np.asarray(first.layer.kernel, dtype=np.float32)  # (kh, kw, in, out); depthwise (kh, kw, in, 1)
    if first.kind != "Conv2D":
        kernel = np.transpose(kernel, (0, 1, 3, 2))[..., :1, :]
    kh, kw, channels, count = kernel.shape
    tiles = np.transpose(kernel, (3, 0, 1, 2))[:MAX_CHANNELS * 2]  # (out, kh, kw, in)
    scale = float(np.abs(tiles).max()) or 1.0
    shown = "" if len(tiles) == count else f", first {len(tiles)} shown"
    if channels == 3:
        if _caffe_preprocessing(probe, first):
            tiles = tiles[..., ::-1]  # these kernels read BGR: show them as RGB
        grid = mosaic(enlarge(0.5 + 0.5 * tiles / scale), 16, fill=1.0)
        note = f"RGB: mid-grey = 0, full colour = ±{scale:.2g}"
    else:
        grid = mosaic(enlarge(tiles[..., 0] if channels == 1 else tiles.mean(axis=-1)), 16)
        note = "one input channel" if channels == 1 else f"mean over the {channels} input channels"
    figure, axis = pyplot.subplots(figsize=(10, 1.4 + 8.0 * grid.shape[0] / grid.shape[1]), layout="constrained")
    if channels == 3:
        axis.imshow(grid, interpolation="nearest")
    else:
        colours = pyplot.get_cmap("RdBu_r").with_extremes(bad="white")
        drawn = axis.imshow(grid, cmap=colours, vmin=-scale, vmax=scale, interpolation="nearest")
        figure.colorbar(drawn, ax=axis, fraction=0.03, pad=0.02, label="weight")
    axis.set_title(f"{first.layer.name}: {count} kernels of {kh}x{kw}x{channels}{shown} ({note})", fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
    figure.suptitle(f"First-layer filters — {title}", fontsize=11)
    _save(figure, path)
    return {"layer": first.layer.name, "kernels": int(count), "kernel_shape": [int(kh), int(kw), int(channels)]}


def plot_feature_maps(probe: Probe, image: np.ndarray, label: str, path: Path, title: str) -> dict:
    """One image's activations after each convolution / pooling layer (at most MAX_FEATURE_LAYERS)."""
    pyplot = _pyplot()
    steps = probe.feature_steps
    if len(steps) > MAX_FEATURE_LAYERS:
        picks = np.linspace(0, len(steps) - 1, MAX_FEATURE_LAYERS).round().astype(int)
        steps = [steps[index] for index in sorted(set(picks))]
    maps, _, _ = probe.run(image[None], steps)
    rows = []
    for step, feature_map in zip(steps, maps):
        values = np.asarray(feature_map, dtype=np.float32)[0]
        channels = values.shape[-1]
        shown = np.transpose(values[..., :MAX_CHANNELS], (2, 0, 1))
        grid = mosaic(enlarge(shown), 16)
        rows.append((step, values, channels, grid))
    heights = [2.2] + [0.5 + 9.0 * grid.shape[0] / grid.shape[1] for *_, grid in rows]
    figure, axes = pyplot.subplots(
        len(heights), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False,
        layout="constrained",
    )
    axes = axes[:, 0]
    show_image(axes[0], image)
    axes[0].set_title(f"input image ({label})", fontsize=10)
    colours = pyplot.get_cmap("viridis").with_extremes(bad="white")
    for axis, (step, values, channels, grid) in zip(axes[1:], rows):
        low, high = float(values.min()), float(values.max())
        drawn = axis.imshow(grid, cmap=colours, vmin=low, vmax=high if high > low else low + 1e-6, interpolation="nearest")
        figure.colorbar(drawn, ax=axis, fraction=0.02, pad=0.01, label="activation")
        height, width = values.shape[:2]
        shown = f"{channels} channels" if channels <= MAX_CHANNELS else f"first {MAX_CHANNELS} of {channels} channels"
        axis.set_title(f"{step.layer.name} ({step.kind}): {height}x{width}x{channels} — {shown}", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    layers_note = "" if len(steps) == len(probe.feature_steps) else f" ({len(steps)} of {len(probe.feature_steps)} layers)"
    figure.suptitle(f"Feature maps{layers_note} — {title}")
    _save(figure, path)
    return {"layers": [step.layer.name for step in steps]}


def plot_maximization(
    filters: Maximized | None, filter_ids: Sequence[int], layer: str | None,
    classes: Maximized, class_ids: Sequence[int], names: Sequence[str], steps: int, path: Path, title: str,
) -> None:
    pyplot = _pyplot()
    rows = ([("filter", filters, filter_ids)] if filters is not None else []) + [("class", classes, class_ids)]
    columns = max(len(ids) for _, _, ids in rows)
    figure, axes = pyplot.subplots(
        len(rows), columns, figsize=(1.45 * columns + 0.5, 1.9 * len(rows) + 0.9), squeeze=False, layout="constrained"
    )
    for row, (kind, result, ids) in enumerate(rows):
        for column in range(columns):
            axis = axes[row, column]
            axis.axis("off")
            if column >= len(ids):
                continue
            image = result.images[column]
            low, high = float(image.min()), float(image.max())
            show_image(axis, (image - low) / (high - low) if high > low else image)
            if kind == "filter":
                axis.set_title(f"filter {ids[column]}\n{result.start[column]:.2g} → {result.end[column]:.2g}", fontsize=8)
            else:
                axis.set_title(
                    f"class {names[ids[column]]}\nlogit {result.start[column]:.2g} → {result.end[column]:.2g}", fontsize=8
                )
    what = f"filters of {layer} (mean activation: noise → after)" if filters is not None else ""
    rows_note = "top: " + what + "; bottom: class scores" if filters is not None else "class scores (no convolution layer)"
    figure.suptitle(
        f"Activation maximisation, {steps} gradient-ascent steps from noise — {title}\n"
        f"{rows_note}; each image contrast-stretched",
        fontsize=9,
    )
    _save(figure, path)


def _label(names: Sequence[str], predicted: int, true: int, confidence: float) -> str:
    return f"pred {names[predicted]} ({confidence:.0%})\ntrue {names[true]}"


def plot_saliency(images, maps, labels, predictions, confidences, names, path: Path, title: str) -> None:
    pyplot = _pyplot()
    count = len(images)
    figure, axes = pyplot.subplots(2, count, figsize=(1.6 * count + 1.4, 4.2), squeeze=False, layout="constrained")
    scaled = heat(maps)
    for column in range(count):
        show_image(axes[0, column], images[column])
        axes[0, column].set_title(_label(names, predictions[column], labels[column], confidences[column]), fontsize=8)
        drawn = axes[1, column].imshow(scaled[column], cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[1, column].set_xticks([])
        axes[1, column].set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("saliency", fontsize=9)
    figure.colorbar(drawn, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="|d score / d pixel| / max")
    figure.suptitle(f"Saliency of the predicted class's logit — {title}", fontsize=10)
    _save(figure, path)


def plot_cam(images, heats, method: str, layer: str, map_shape, labels, predictions, confidences, names, path, title):
    pyplot = _pyplot()
    count = len(images)
    figure, axes = pyplot.subplots(2, count, figsize=(1.6 * count + 1.4, 4.2), squeeze=False, layout="constrained")
    for column in range(count):
        show_image(axes[0, column], images[column])
        axes[0, column].set_title(_label(names, predictions[column], labels[column], confidences[column]), fontsize=8)
        grey = images[column].mean(axis=-1)
        axes[1, column].imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        drawn = axes[1, column].imshow(heats[column], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
        axes[1, column].set_xticks([])
        axes[1, column].set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel(method, fontsize=9)
    figure.colorbar(drawn, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label=f"{method} / max")
    formula = "sum_k w_k A_k" if method == "CAM" else "ReLU(sum_k alpha_k A_k)"
    figure.suptitle(
        f"{method} ({formula}) of the predicted class on {layer} ({map_shape[0]}x{map_shape[1]}, "
        f"each cell drawn at the centre of what it sees) — {title}",
        fontsize=10,
    )
    _save(figure, path)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    pyplot = _pyplot()
    count = len(names)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    side = max(4.5, 0.5 * count + 1.5)
    figure, axes = pyplot.subplots(1, 2, figsize=(2 * side + 1.5, side), layout="constrained")
    for axis, values, label, number in (
        (axes[0], matrix, "images", "{:d}"),
        (axes[1], normalised, "fraction of the true class", "{:.2f}"),
    ):
        drawn = axis.imshow(values, cmap="Blues", vmin=0, vmax=None if values is matrix else 1.0)
        figure.colorbar(drawn, ax=axis, fraction=0.046, pad=0.04, label=label)
        axis.set_xticks(range(count), names, rotation=45 if max(len(name) for name in names) > 2 else 0, ha="right" if max(len(name) for name in names) > 2 else "center")
        axis.set_yticks(range(count), names)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        if count <= 20:
            threshold = values.max() / 2 if values.max() else 1
            for row in range(count):
                for column in range(count):
                    value = values[row, column]
                    if matrix[row, column] == 0:
                        continue  # blank cells stay blank: the mistakes stand out
                    axis.text(
                        column, row, number.format(int(value) if values is matrix else value), ha="center",
                        va="center", fontsize=9 if count <= 10 else 7, color="white" if value > threshold else "black",
                    )
    axes[0].set_title("counts")
    axes[1].set_title("row-normalised (recall on the diagonal)")
    figure.suptitle(f"Confusion matrix on {int(matrix.sum())} test images — {title}")
    _save(figure, path)


def plot_misclassified(images, labels, predictions, confidences, names, mistakes: int, total: int, path: Path, title: str) -> None:
    pyplot = _pyplot()
    count = len(images)
    if count == 0:
        figure, axis = pyplot.subplots(figsize=(6, 2), layout="constrained")
        axis.axis("off")
        axis.text(0.5, 0.5, f"no misclassified images among the {total} test images", ha="center", va="center")
    else:
        rows, columns = _grid(count, 8)
        figure, axes = pyplot.subplots(
            rows, columns, figsize=(1.6 * columns + 0.4, 2.0 * rows + 0.6), squeeze=False, layout="constrained"
        )
        for index, axis in enumerate(axes.flat):
            axis.axis("off")
            if index < count:
                show_image(axis, images[index])
                axis.set_title(_label(names, predictions[index], labels[index], confidences[index]), fontsize=8)
    figure.suptitle(f"The {count} most confident of {mistakes} mistakes on {total} test images — {title}", fontsize=10)
    _save(figure, path)


# --------------------------------------------------------------------------- metrics


def per_class_metrics(matrix: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Precision, recall and F1 per class (null where undefined: no images predicted / present)."""
    rows = []
    for index, name in enumerate(names):
        true_positive = int(matrix[index, index])
        predicted = int(matrix[:, index].sum())
        actual = int(matrix[index, :].sum())
        precision = true_positive / predicted if predicted else None
        recall = true_positive / actual if actual else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else (0.0 if precision is not None and recall is not None else None)
        )
        rows.append(
            {"class": index, "name": name, "precision": precision, "recall": recall, "f1": f1, "support": actual}
        )
    return rows


# --------------------------------------------------------------------------- all of it


def visualize_model(
    model,
    data: ImageSet,
    output: Path,
    *,
    images: int = DEFAULT_IMAGES,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    model_name: str = "",
    say=print,
) -> dict:
    """Write every picture and visualization.json into ``output``; returns the report."""
    check_fits(model, data)
    output.mkdir(parents=True, exist_ok=True)
    probe = Probe(model)
    names = data.class_names
    title = f"{model_name or model.name} on {data.name}"

    logits, probabilities = probe.predict(data.images)
    predictions = probabilities.argmax(axis=1)
    confidences = probabilities.max(axis=1)
    count = len(names)
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (data.labels, predictions), 1)
    report: dict = {
        "module": MODULE,
        "model": model_name or model.name,
        "dataset": data.name,
        "data_source": data.source,
        "test_images": int(len(data.images)),
        "input_shape": list(data.images.shape[1:]),
        "class_names": list(names),
        "accuracy": float((predictions == data.labels).mean()),
        "per_class": per_class_metrics(matrix, names),
        "confusion_matrix": matrix.tolist(),
        "class_scores": f"logits of {probe.classifier.layer.name} (before its softmax)",
        "pictures": {},
        "skipped": {},
    }
    shown = slice(0, images)
    sample, sample_labels = data.images[shown], data.labels[shown]
    sample_predictions, sample_confidences = predictions[shown], confidences[shown]
    label_args = (sample_labels, sample_predictions, sample_confidences, names)

    def written(name: str, what: str) -> None:
        report["pictures"][name] = what
        say(f"training: wrote {output / name}")

    if probe.convolutions:
        report["filters"] = plot_filters(probe, output / "filters.png", title)
        written("filters.png", "the first convolution's kernels")
        first_label = f"pred {names[predictions[0]]}, true {names[data.labels[0]]}"
        report["feature_maps"] = plot_feature_maps(probe, data.images[0], first_label, output / "feature_maps.png", title)
        written("feature_maps.png", "one test image's activations after each convolution / pooling layer")
    else:
        for name in ("filters.png", "feature_maps.png"):
            report["skipped"][name] = "the model has no convolution layer"

    class_ids = list(range(min(count, MAXIMIZED_CLASSES)))
    centre = float(np.median(data.images))  # the typical background pixel: black for digits, grey for CIFAR-10
    filter_ids, layer = [], None
    maximization = {"steps": steps, "seed": seed, "start": f"uniform noise of +-0.05 around {centre:.3f} (the median pixel)"}
    if probe.convolutions:
        target = probe.gradcam_step
        layer = target.layer.name
        filter_ids = selective_filters(probe, target, data.images[:256], MAXIMIZED_FILTERS, seed, centre)
    # One ascent for both rows (one graph to trace): the filters' images first, then the classes'.
    objective = stacked_objective(
        filter_objective(probe, probe.gradcam_step, filter_ids) if filter_ids else None,
        len(filter_ids),
        class_objective(probe, class_ids),
    )
    ascended = maximize(objective, data.images.shape[1:], len(filter_ids) + len(class_ids), steps=steps, seed=seed, centre=centre)
    filters = ascended.part(slice(0, len(filter_ids))) if filter_ids else None
    classes = ascended.part(slice(len(filter_ids), None))
    if filters is not None:
        maximization["layer"] = layer
        maximization["filters"] = [
            {"filter": k, "start_mean_activation": float(a), "end_mean_activation": float(b)}
            for k, a, b in zip(filter_ids, filters.start, filters.end)
        ]
    maximization["classes"] = [
        {"class": names[c], "start_logit": float(a), "end_logit": float(b)}
        for c, a, b in zip(class_ids, classes.start, classes.end)
    ]
    report["activation_maximization"] = maximization
    plot_maximization(
        filters, filter_ids, layer, classes, class_ids, names, steps, output / "activation_maximization.png", title
    )
    written("activation_maximization.png", "inputs that maximise filters of the last convolution and each class score")

    plot_saliency(sample, saliency_maps(probe, sample, sample_predictions), *label_args, output / "saliency.png", title)
    written("saliency.png", "|d class score / d input| of the predicted class")

    if probe.cam_step is not None or probe.gradcam_step is not None:
        method, heats = localisation_maps(probe, sample, sample_predictions)
        step = probe.cam_step if method == "CAM" else probe.gradcam_step
        map_shape = [int(size) for size in step.output.shape[1:]]
        report["cam"] = {"method": method, "layer": step.layer.name, "feature_map_shape": map_shape}
        plot_cam(sample, heats, method, step.layer.name, map_shape, *label_args, output / "cam.png", title)
        written("cam.png", f"{method} of the predicted class over the image")
    else:
        report["skipped"]["cam.png"] = "the model has no convolution layer (neither CAM nor Grad-CAM applies)"

    plot_confusion(matrix, names, output / "confusion_matrix.png", title)
    written("confusion_matrix.png", "counts and row-normalised")
    wrong = np.flatnonzero(predictions != data.labels)
    worst = wrong[np.argsort(-confidences[wrong], kind="stable")][:images]
    plot_misclassified(
        data.images[worst], data.labels[worst], predictions[worst], confidences[worst], names, len(wrong), len(data.images),
        output / "misclassified.png", title,
    )
    written("misclassified.png", "the most confident mistakes")
    report["misclassified"] = int(len(wrong))
    for name, reason in report["skipped"].items():
        say(f"training: skipped {name}: {reason}")
    partial = output / f".{REPORT_FILE}.part"
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, output / REPORT_FILE)  # a reader never sees half a report
    return report


def visualize(options: VisualizeOptions) -> dict:
    """Load the model and the test images, then :func:`visualize_model`."""
    _, keras = run.import_tensorflow()
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
    return run.run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
