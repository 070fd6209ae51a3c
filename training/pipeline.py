"""The tf.data input pipeline shared by every module (imports TensorFlow: call it lazily).

Why tf.data rather than numpy into ``model.fit``: scaling, one-hot encoding and
augmentation run in a parallel map (``num_parallel_calls=AUTOTUNE``) and ``prefetch``
overlaps the next batches with the accelerator's work on the current one.  The
augmentation is the course's (horizontal flip, width/height shift 0.1) expressed with
Keras 3 preprocessing layers in the map — not in the model, where random translation
would switch XLA off for the whole model and would run on the accelerator's critical
path.  The map works on whole batches, so each call augments ``batch_size`` images.
"""

from __future__ import annotations

import numpy as np

SHIFT_FRACTION = 0.1


def build_augmentation(seed: int):
    """The course's ImageDataGenerator(width/height_shift_range=0.1, horizontal_flip=True)."""
    import keras

    return [
        keras.layers.RandomFlip("horizontal", seed=seed),
        # ImageDataGenerator's default fill mode was "nearest".
        keras.layers.RandomTranslation(SHIFT_FRACTION, SHIFT_FRACTION, fill_mode="nearest", seed=seed + 1),
    ]


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    pixel_max: float,
    batch_size: int,
    shuffle: bool,
    seed: int,
    augment: bool = False,
):
    """Batches of (float32 images in [0, 1], one-hot labels), prefetched.

    ``images`` may be uint8 (scaled by ``1 / pixel_max`` in the map) or float features
    (``pixel_max`` 1.0).  The pipeline shuffles and batches *indices* and gathers each
    batch in one op: every epoch is a fresh permutation (as ``model.fit(shuffle=True)``
    on numpy arrays), at about twice the rate of shuffling the images one by one
    (measured here: ~89,000 vs ~48,000 images/s for the plain pipeline alone).
    """
    import tensorflow as tf

    all_images = tf.constant(images)
    all_labels = tf.constant(labels)
    indices = tf.data.Dataset.range(len(images))
    if shuffle:
        indices = indices.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    indices = indices.batch(batch_size)
    scale = 1.0 / float(pixel_max)
    augmentation_layers = build_augmentation(seed) if augment else []

    def prepare(batch_indices):
        batch_images = tf.cast(tf.gather(all_images, batch_indices), tf.float32) * scale
        for layer in augmentation_layers:
            batch_images = layer(batch_images, training=True)
        return batch_images, tf.one_hot(tf.gather(all_labels, batch_indices), num_classes)

    dataset = indices.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    # Parallelism comes from the map running several batches at once; single-threaded ops
    # inside each call keep the pipeline from fighting the model's own thread pool.
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    return dataset.with_options(options)


def make_splits_datasets(splits, *, batch_size: int, seed: int, augment: bool = False):
    """(train, validation, test) datasets for a :class:`training.data.Splits`."""
    common = {"num_classes": splits.num_classes, "pixel_max": splits.pixel_max, "batch_size": batch_size, "seed": seed}
    train = make_dataset(splits.x_train, splits.y_train, shuffle=True, augment=augment, **common)
    validation = make_dataset(splits.x_val, splits.y_val, shuffle=False, **common)
    test = make_dataset(splits.x_test, splits.y_test, shuffle=False, **common)
    return train, validation, test
