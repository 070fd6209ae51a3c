"""Title: CIFAR-10 with the course CNN and image augmentation
Demonstrates: augmenting the training images on the fly (random shifts and left-right
flips) in the tf.data input pipeline, so the network overfits less and more epochs keep
helping.
Reaches: ~68% test accuracy on CIFAR-10 (the course notebook's 68.3%).

The course trained the CNN of :mod:`training.cifar10_cnn` on images randomly shifted by
up to 10% horizontally and vertically and flipped left-right, with Keras 2's
ImageDataGenerator — gone from Keras 3's public API.  Here the same augmentation (a
random shift of up to 10%, bilinear, edges repeated, and a left-right flip;
:func:`training.pipeline.augment_batch`) is applied to whole batches in a tf.data map
with ``num_parallel_calls=AUTOTUNE`` and ``prefetch``: it runs on the CPU in parallel
with training, and it is not part of the saved model (so the model stays XLA-compilable
and predicts on unaugmented images).  The data and the model are the CNN module's.

How to run it:

    python -m training.cifar10_augmentation --output runs/cnn-aug
    python -m training.cifar10_augmentation --dataset digits --optimizer adam

Outputs in ``--output``: best_model.keras, history.csv, metrics.json,
training_curves.png, and checkpoint/ while a run is unfinished (rerun to resume).
"""

from __future__ import annotations

from typing import Sequence

from training import cli, outputs, visualize
from training.callbacks import CourseCallbacks
from training.cifar10_cnn import build_model, load_data  # the same CNN, the same data and split
from training.pipeline import AUGMENTATION, make_splits_datasets
from training.session import make_optimizer, start_session

MODULE = "training.cifar10_augmentation"


def build_parser():
    return cli.build_parser(
        MODULE,
        "Train the course CNN with flip + shift augmentation in tf.data.",
        default_dataset="cifar10",
        default_epochs=30,
        default_batch_size=32,
        default_optimizer="rmsprop",
        default_learning_rate=0.001,
    )


def train(options: cli.RunOptions, *, extra_callbacks: Sequence[object] = ()) -> dict:
    """Load the data, train on augmented images, evaluate the best checkpoint; returns metrics.json's content."""
    # 1. The data: CIFAR-10 (or --dataset), the first 10% held out for validation.
    splits = load_data(options)

    # 2. The model: the course CNN (training.cifar10_cnn.build_model).
    session = start_session(options)
    with session.strategy.scope():
        model = build_model(splits.image_shape, splits.num_classes)
        model.compile(
            optimizer=make_optimizer(options.optimizer, options.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=options.xla,
        )

    # 3. Train on augmented images: each batch of the training set is shifted and flipped
    #    afresh every epoch; validation and test images stay as they are.
    train_data, validation_data, test_data = make_splits_datasets(
        splits, batch_size=options.batch_size, seed=options.seed, augment=True
    )
    callbacks = CourseCallbacks(options, train_data, extra=extra_callbacks)
    # model.fit from where the step checkpoint stands (the start, or the step after a stop).
    callbacks.fit(model, train_data, validation_data=validation_data)

    # 4. The test accuracy of the best epoch's weights.
    best_model = callbacks.best_model(model)
    test_loss, test_accuracy = best_model.evaluate(test_data, verbose=0)
    metrics = outputs.finish(
        options, session, splits, best_model, callbacks, test_loss, test_accuracy, augmentation=AUGMENTATION
    )
    if options.visualize:
        visualize.after_training(best_model, splits, options)
    return metrics


def _main(argv: Sequence[str] | None) -> dict:
    options, _ = cli.parse_options(build_parser(), argv, MODULE)
    return train(options)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_cli(_main, argv)


if __name__ == "__main__":
    cli.exit_process(main())
