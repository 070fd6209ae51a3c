"""Fit a small dense classifier on scikit-learn's 8x8 digits with Keras, and save it.

A user's own training script, not one of gpuflow's: its own option names, and it writes
everything to $GPUFLOW_OUTPUT_DIR (which `gpuflow run` pulls back), else ./artifacts.
With GPUFLOW_SMOKE=1 (the CI smoke test) it shrinks itself to one epoch on 200 images.
"""

import argparse
import json
import os
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-epochs", type=int, default=30)
    parser.add_argument("--hidden-units", type=int, default=64)
    parser.add_argument("--save-to", type=Path, default=Path(os.environ.get("GPUFLOW_OUTPUT_DIR", "artifacts")))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    smoke = os.environ.get("GPUFLOW_SMOKE") == "1"

    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)  # ships with scikit-learn: no download
    images = images.astype("float32") / 16.0
    if smoke:
        images, labels = images[:200], labels[:200]
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, random_state=0)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(shape=(64,)),
        keras.layers.Dense(args.hidden_units, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=1 if smoke else args.n_epochs, batch_size=32, verbose=2)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)

    args.save_to.mkdir(parents=True, exist_ok=True)
    model.save(args.save_to / "classifier.keras")
    metrics = {"test_loss": float(loss), "test_accuracy": float(accuracy), "smoke": smoke}
    (args.save_to / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"test accuracy {accuracy:.3f}; model saved to {args.save_to / 'classifier.keras'}")


if __name__ == "__main__":
    main()
