"""The course's models, rebuilt in Keras 3, and the loader for models these modules save.

Keras is imported inside the functions so that importing :mod:`training` stays cheap.
Every classifier ends in a float32 softmax so that ``--mixed-precision`` keeps the
probabilities (and the loss) in full precision.
"""

from __future__ import annotations

from pathlib import Path

MNIST_MLP_WEIGHTS = 669_706  # on 28x28 inputs, 10 classes
CIFAR10_CNN_WEIGHTS = 528_054  # on 32x32x3 inputs, 10 classes


def build_mlp(input_shape: tuple[int, ...], num_classes: int):
    """Flatten → Dense 512 relu → Dropout 0.2 → Dense 512 relu → Dropout 0.2 → Dense softmax."""
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            layers.Dropout(0.2),
            layers.Dense(512, activation="relu"),
            layers.Dropout(0.2),
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name="mnist_mlp",
    )


def build_cnn(input_shape: tuple[int, ...], num_classes: int):
    """Conv2D 16/32/64 (kernel 2, same, relu) each + MaxPooling2D(2); Dropout 0.3; Flatten;
    Dense 500 relu; Dropout 0.4; Dense softmax."""
    import keras

    layers = keras.layers
    model_layers = [keras.Input(shape=input_shape)]
    for filters in (16, 32, 64):
        model_layers += [
            layers.Conv2D(filters, kernel_size=2, padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=2),
        ]
    model_layers += [
        layers.Dropout(0.3),
        layers.Flatten(),
        layers.Dense(500, activation="relu"),
        layers.Dropout(0.4),
        layers.Dense(num_classes, activation="softmax", dtype="float32"),
    ]
    return keras.Sequential(model_layers, name="cifar10_cnn")


def load_model(path: Path):
    """Load a ``.keras`` model written by any training module (incl. its custom layers)."""
    import keras

    import training.layers  # noqa: F401  (registers ImagenetPreprocessing for deserialisation)

    return keras.models.load_model(Path(path), compile=True)
