"""The course's augmentation in training.pipeline: exact against TensorFlow's own transform,
random where it should be, reproducible where it should be."""

from __future__ import annotations

import numpy as np
import pytest

from training import pipeline

tf = pytest.importorskip("tensorflow")


def projective_reference(images, shift_x, shift_y, flip):
    """What RandomTranslation(fill_mode="nearest") computes, then RandomFlip("horizontal")."""
    count = images.shape[0]
    ones, zeros = np.ones(count, np.float32), np.zeros(count, np.float32)
    # The transform maps output (x, y) to input (x - shift_x, y - shift_y).
    transforms = np.stack([ones, zeros, -shift_x, zeros, ones, -shift_y, zeros, zeros], axis=1)
    shifted = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=images.shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    ).numpy()
    return np.where(flip[:, None, None, None], shifted[:, :, ::-1, :], shifted)


def test_shift_and_flip_equals_the_projective_transform_with_nearest_fill():
    rng = np.random.default_rng(0)
    images = rng.random((6, 32, 24, 3), dtype=np.float32)  # not square: rows and columns kept apart
    shift_x = np.array([0.0, 2.4, -2.4, 1.5, -0.3, 2.39], np.float32)
    shift_y = np.array([0.0, -3.2, 3.2, 0.7, 2.9, -1.01], np.float32)
    flip = np.array([False, True, False, True, True, False])
    ours = pipeline.shift_and_flip(tf.constant(images), shift_x, shift_y, tf.constant(flip)).numpy()
    np.testing.assert_allclose(ours, projective_reference(images, shift_x, shift_y, flip), atol=1e-6)


def test_whole_pixel_shifts_move_content_and_repeat_the_edge():
    image = np.arange(5 * 4, dtype=np.float32).reshape(1, 5, 4, 1)
    shifted = pipeline.shift_and_flip(tf.constant(image), np.float32([1.0]), np.float32([-2.0]), tf.constant([False]))
    expected = image[0, :, :, 0]
    expected = np.concatenate([expected[2:], expected[-1:], expected[-1:]], axis=0)  # up 2, last row repeated
    expected = np.concatenate([expected[:, :1], expected[:, :-1]], axis=1)  # right 1, first column repeated
    np.testing.assert_array_equal(shifted.numpy()[0, :, :, 0], expected)
    mirrored = pipeline.shift_and_flip(tf.constant(image), np.float32([0.0]), np.float32([0.0]), tf.constant([True]))
    np.testing.assert_array_equal(mirrored.numpy()[0], image[0, :, ::-1])


def test_augment_batch_draws_shifts_within_ten_percent_and_flips_about_half():
    # Each image is a horizontal ramp 0..31: after a shift by s and no flip, pixel (r, c)
    # holds clip(c - s), and after a flip clip(31 - c - s): the slope tells the flip, the
    # middle column the shift.
    ramp = np.tile(np.arange(32, dtype=np.float32)[None, :, None], (32, 1, 1))
    images = np.tile(ramp[None], (512, 1, 1, 3))
    augmented = pipeline.augment_batch(tf.constant(images), tf.constant([3, 4], tf.int64)).numpy()
    middle = augmented[:, 16, 16, 0]
    flipped = augmented[:, 16, 20, 0] < augmented[:, 16, 12, 0]
    shift = np.where(flipped, 15.0 - middle, 16.0 - middle)
    assert np.all(np.abs(shift) <= 0.1 * 32 + 1e-4)
    assert shift.max() > 2.5 and shift.min() < -2.5  # spread over the range, not a constant
    assert 0.4 < flipped.mean() < 0.6


def test_augmentation_is_reproducible_per_seed_and_new_every_epoch():
    images = np.random.default_rng(0).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(64) % 10
    common = {"num_classes": 10, "pixel_max": 255.0, "batch_size": 16, "shuffle": False, "augment": True}

    def epochs(dataset, count):
        return [np.concatenate([batch.numpy() for batch, _ in dataset]) for _ in range(count)]

    first, second = epochs(pipeline.make_dataset(images, labels, seed=7, **common), 2)
    again_first, again_second = epochs(pipeline.make_dataset(images, labels, seed=7, **common), 2)
    (other_seed,) = epochs(pipeline.make_dataset(images, labels, seed=8, **common), 1)
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)
    assert not np.allclose(first, second)
    assert not np.allclose(first, other_seed)
    # Augmentation moves pixels but never invents values outside the image's range.
    assert first.min() >= 0.0 and first.max() <= 1.0
