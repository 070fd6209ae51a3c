"""Where the network looks: true CAM, Grad-CAM, saliency and SmoothGrad maps, CAM placed
on the image by where each feature-map cell looks (:func:`geometry_of`)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from training.visualize.probe import CONVOLUTIONS, POOLINGS, Probe, Step, _is_feature_map


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


# SmoothGrad (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise"): the
# paper's settings, noise sigma 10-20% of the image's pixel range and ~50 samples
# (it sees little change past 50; 25 keeps the picture's cost small).
SMOOTHGRAD_SAMPLES = 25
SMOOTHGRAD_SPREAD = 0.15


# One compiled gradient function per probe: SmoothGrad calls it once per noisy copy, and
# a traced graph takes ~40% less CPU than the eager tape (same values).
_GRADIENT_FUNCTIONS: "weakref.WeakKeyDictionary[Probe, object]" = weakref.WeakKeyDictionary()


def _input_gradients(probe: Probe, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """d logit_c / d pixel for each image and its class (N, H, W, C)."""
    import tensorflow as tf

    function = _GRADIENT_FUNCTIONS.get(probe)
    if function is None:
        owner = weakref.ref(probe)  # the cached function must not keep its probe alive

        @tf.function(reduce_retracing=True)
        def function(pixels, wanted):
            with tf.GradientTape() as tape:
                tape.watch(pixels)
                _, logits, _ = owner().run(pixels)
                scores = tf.gather(logits, wanted, batch_dims=1)
            return tape.gradient(scores, pixels)

        _GRADIENT_FUNCTIONS[probe] = function
    pixels = tf.convert_to_tensor(images, dtype=tf.float32)
    return function(pixels, tf.constant(np.asarray(classes), dtype=tf.int32)).numpy()


def saliency_maps(probe: Probe, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Plain gradient saliency (Simonyan et al. 2014): |d logit_c / d pixel|, the largest
    over the colour channels (N, H, W)."""
    return np.abs(_input_gradients(probe, images, classes)).max(axis=-1)


def smoothgrad_maps(
    probe: Probe,
    images: np.ndarray,
    classes: np.ndarray,
    *,
    samples: int = SMOOTHGRAD_SAMPLES,
    spread: float = SMOOTHGRAD_SPREAD,
    seed: int = 0,
) -> np.ndarray:
    """SmoothGrad: |mean over ``samples`` noisy copies x + N(0, sigma^2) of d logit_c / d pixel|,
    the largest over the colour channels (N, H, W); sigma is ``spread`` x each image's
    pixel range (max - min), the noise drawn from ``seed``.

    The signed gradients are averaged before the absolute value: the gradient's sign
    flickers from pixel to pixel where the network only sees noise, and averages out
    there, while it stays the same over what the class score depends on.
    """
    if samples < 1:
        raise ValueError(f"SmoothGrad needs at least one noisy copy, not {samples}")
    images = np.asarray(images, dtype=np.float32)
    rng = np.random.default_rng(seed)
    ranges = images.reshape(len(images), -1).max(axis=1) - images.reshape(len(images), -1).min(axis=1)
    sigma = (spread * np.where(ranges > 0, ranges, 1.0)).reshape(-1, *([1] * (images.ndim - 1)))
    total = np.zeros_like(images)
    for _ in range(samples):
        noisy = images + sigma * rng.standard_normal(images.shape, dtype=np.float32)
        total += _input_gradients(probe, noisy.astype(np.float32), classes)
    return np.abs(total / samples).max(axis=-1)


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
