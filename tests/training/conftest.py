"""Fixtures for the training tests: tiny datasets written in the official file formats,
and pretrained-base stand-ins built locally (nothing is downloaded)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

CIFAR_TRAIN_PER_BATCH = 40
CIFAR_TEST_IMAGES = 40


def cifar_batch_bytes(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    """One batch in the official format: a pickled dict with bytes keys, data N x 3072 (R, G, B planes)."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(rows, dtype=np.uint8),
        b"filenames": [f"image_{index}.png".encode() for index in range(len(images))],
    }
    # The official files were written by Python 2's cPickle (protocol 2).
    return pickle.dumps(batch, protocol=2)


def make_cifar_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    train_count = 5 * CIFAR_TRAIN_PER_BATCH
    x_train = rng.integers(0, 256, size=(train_count, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, size=train_count)
    x_test = rng.integers(0, 256, size=(CIFAR_TEST_IMAGES, 32, 32, 3), dtype=np.uint8)
    y_test = rng.integers(0, 10, size=CIFAR_TEST_IMAGES)
    return x_train, y_train, x_test, y_test


def cifar_files(x_train, y_train, x_test, y_test) -> dict[str, bytes]:
    files = {}
    for index in range(5):
        part = slice(index * CIFAR_TRAIN_PER_BATCH, (index + 1) * CIFAR_TRAIN_PER_BATCH)
        files[f"data_batch_{index + 1}"] = cifar_batch_bytes(x_train[part], y_train[part], f"training batch {index + 1} of 5")
    files["test_batch"] = cifar_batch_bytes(x_test, y_test, "testing batch 1 of 1")
    files["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
    return files


@pytest.fixture
def cifar_arrays():
    return make_cifar_arrays()


@pytest.fixture
def cifar_directory(tmp_path, cifar_arrays) -> Path:
    """<tmp>/data/cifar-10-batches-py/ as the official tarball unpacks it."""
    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name, content in cifar_files(*cifar_arrays).items():
        (batches / name).write_bytes(content)
    return tmp_path / "data"


@pytest.fixture
def cifar_tarball(tmp_path, cifar_arrays) -> Path:
    """<tmp>/tarball/cifar-10-python.tar.gz with the members under cifar-10-batches-py/."""
    directory = tmp_path / "tarball"
    directory.mkdir()
    path = directory / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, content in cifar_files(*cifar_arrays).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture
def mnist_directory(tmp_path) -> Path:
    """<tmp>/mnist/mnist.npz with the official keys: learnable stripes, one row per class."""
    rng = np.random.default_rng(1)

    def draw(count):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 60, size=(count, 28, 28)).astype(np.uint8)
        for index, label in enumerate(labels):
            images[index, 2 + 2 * label : 4 + 2 * label, :] = 255
        return images, labels.astype(np.uint8)

    x_train, y_train = draw(400)
    x_test, y_test = draw(100)
    directory = tmp_path / "mnist"
    directory.mkdir()
    np.savez_compressed(directory / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return directory


@pytest.fixture(scope="session")
def mobilenet_weights(tmp_path_factory) -> Path:
    """A MobileNetV2 (no top, 32x32x3) weights file, built here instead of downloading imagenet."""
    # Session fixtures run before the autouse KERAS_HOME fixture: keep Keras out of ~ here too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home-session")))
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras

        base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
        path = tmp_path_factory.mktemp("bases") / "mobilenetv2_notop.weights.h5"
        base.save_weights(path)
    return path
