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


def augmented_through(route: str, images: np.ndarray) -> np.ndarray:
    """Augment uint8 ``images`` by calling augment_batch directly or through make_dataset."""
    if route == "augment_batch":
        return pipeline.augment_batch(tf.constant(images, tf.float32), tf.constant([3, 4], tf.int64)).numpy()
    dataset = pipeline.make_dataset(
        images, np.zeros(len(images), np.int64), num_classes=10, pixel_max=1.0,
        batch_size=len(images), shuffle=False, seed=3, augment=True,
    )
    return next(iter(dataset))[0].numpy()


@pytest.mark.parametrize("route", ["augment_batch", "make_dataset"])
def test_shifts_stay_within_ten_percent_of_each_side_and_half_the_images_flip(route):
    # Images 20 high and 40 wide (so width and height cannot be mixed up unseen): in the
    # first channel a ramp across (value = column), in the second a ramp down (value = row).
    # A shift by (sx, sy) turns pixel (r, c) into (clip(r - sy), clip(c - sx)), a flip
    # reverses the columns: the middle pixel gives the shifts, the slope the flip.
    height, width = 20, 40
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([columns, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    augmented = augmented_through(route, np.repeat(image[None], 512, axis=0))
    assert augmented.shape == (512, height, width, 3)
    centre_row, centre_column = height // 2, width // 2
    flipped = augmented[:, centre_row, centre_column + 4, 0] < augmented[:, centre_row, centre_column - 4, 0]
    across = augmented[:, centre_row, centre_column, 0]
    shift_x = np.where(flipped, (width - 1 - centre_column) - across, centre_column - across)
    shift_y = centre_row - augmented[:, centre_row, centre_column, 1]
    assert np.all(np.abs(shift_x) <= 0.1 * width + 1e-4) and np.all(np.abs(shift_y) <= 0.1 * height + 1e-4)
    # Spread over the whole range, not a constant: near both ends on each axis.
    assert shift_x.max() > 0.08 * width and shift_x.min() < -0.08 * width
    assert shift_y.max() > 0.08 * height and shift_y.min() < -0.08 * height
    assert 0.4 < flipped.mean() < 0.6


def test_columns_first_input_gives_the_same_result():
    images = np.random.default_rng(2).random((3, 12, 18, 2), dtype=np.float32)
    shift_x, shift_y = np.float32([1.7, -1.8, 0.2]), np.float32([-1.2, 0.5, 1.1])
    flip = tf.constant([True, False, True])
    standard = pipeline.shift_and_flip(tf.constant(images), shift_x, shift_y, flip)
    columns_first = pipeline.shift_and_flip(
        tf.constant(np.swapaxes(images, 1, 2)), shift_x, shift_y, flip, columns_first=True
    )
    np.testing.assert_array_equal(standard.numpy(), columns_first.numpy())


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
