"""Title: CIFAR-10 object recognition with the course CNN
Demonstrates: a small convolutional network (convolution + max pooling blocks, dropout,
a dense classifier) and keeping the epoch with the lowest validation loss.
Reaches: ~68% test accuracy on CIFAR-10 (the course notebook's best checkpoint, epoch 11,
rmsprop); >= 97% on ``--dataset digits`` (tested, adam, fixed seed).

The model, in Keras 3: Conv2D 16/32/64 (kernel 2, padding same, relu), each followed by
MaxPooling2D(2); Dropout 0.3; Flatten; Dense 500 relu; Dropout 0.4; Dense 10 softmax =
528,054 weights on 32x32x3.  The first 10% of the training images are held out for
validation: CIFAR-10's first 5,000, giving 45,000 / 5,000 / 10,000.  ModelCheckpoint keeps
the epoch with the lowest validation loss, which is what the test accuracy is measured on
(RMSprop at the course's settings diverges later; the checkpoint rescues the result).

How to run it:

    python -m training.cifar10_cnn --output runs/cnn
    python -m training.cifar10_cnn --data-dir ~/data --output runs/cnn   # cifar-10-batches-py or .tar.gz
    python -m training.cifar10_cnn --dataset digits --optimizer adam --epochs 30

Outputs in ``--output``: best_model.keras, history.csv, metrics.json,
training_curves.png, and checkpoint/ while a run is unfinished (rerun to resume).
"""

from __future__ import annotations

from typing import Sequence

from training import cli, outputs, visualize
from training.callbacks import CourseCallbacks
from training.data import Splits, hold_out_validation, load_dataset
from training.pipeline import make_splits_datasets
from training.session import make_optimizer, start_session

MODULE = "training.cifar10_cnn"
VALIDATION_FRACTION = 0.1  # CIFAR-10: the first 5,000 of 50,000


def build_parser():
    return cli.build_parser(
        MODULE,
        "Train the course CNN (528,054 weights on CIFAR-10).",
        default_dataset="cifar10",
        default_epochs=20,
        default_batch_size=32,
        default_optimizer="rmsprop",
        default_learning_rate=0.001,
    )


# --------------------------------------------------------------------------- 1. the data


def load_data(options: cli.RunOptions) -> Splits:
    """The images as stored (uint8) with integer labels; the first 10% of the training
    images held out for validation."""
    data = load_dataset(
        options.dataset, data_dir=options.data_dir, limit=options.limit, seed=options.seed, synthetic_shape=(32, 32, 3)
    )
    return hold_out_validation(data, fraction=VALIDATION_FRACTION, position="first")


# --------------------------------------------------------------------------- 2. the model


def build_model(input_shape: tuple[int, ...], num_classes: int):
    """Conv2D 16/32/64 (kernel 2, same, relu) each + MaxPooling2D(2); Dropout 0.3; Flatten;
    Dense 500 relu; Dropout 0.4; Dense softmax."""
    import keras  # here, not at the top: importing the module stays cheap
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(16, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Conv2D(32, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Conv2D(64, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Dropout(0.3),
            layers.Flatten(),
            layers.Dense(500, activation="relu"),
            layers.Dropout(0.4),
            # float32 even with --mixed-precision: the probabilities and the loss stay exact.
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name="cifar10_cnn",
    )


# --------------------------------------------------------------------------- 3. train and evaluate


def train(options: cli.RunOptions, *, extra_callbacks: Sequence[object] = ()) -> dict:
    """Load the data, train, evaluate the best checkpoint; returns metrics.json's content."""
    splits = load_data(options)

    # Seed, precision policy, and a MirroredStrategy when there are several GPUs.
    session = start_session(options)
    with session.strategy.scope():
        model = build_model(splits.image_shape, splits.num_classes)
        model.compile(
            optimizer=make_optimizer(options.optimizer, options.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=options.xla,
        )

    # tf.data: scaled to [0, 1], one-hot labels, each epoch's order drawn from (seed, epoch), prefetched.
    train_data, validation_data, test_data = make_splits_datasets(
        splits, batch_size=options.batch_size, seed=options.seed
    )
    # Keep the best epoch (best_model.keras), log each epoch (history.csv), save the step checkpoint
    # (checkpoint/: each epoch end, every --save-every-steps / --save-every-seconds, on SIGTERM).
    callbacks = CourseCallbacks(options, train_data, extra=extra_callbacks)
    # model.fit from where the step checkpoint stands (the start, or the step after a stop).
    callbacks.fit(model, train_data, validation_data=validation_data)

    # The test accuracy of the best epoch's weights, not the last epoch's.
    best_model = callbacks.best_model(model)
    test_loss, test_accuracy = best_model.evaluate(test_data, verbose=0)
    metrics = outputs.finish(options, session, splits, best_model, callbacks, test_loss, test_accuracy)
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
