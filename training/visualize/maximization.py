"""Activation maximisation: inputs that maximise a filter's mean activation or a class's
logit, by regularised gradient ascent from noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from training.visualize.probe import Probe, Step


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
