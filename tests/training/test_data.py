"""The dataset readers and splits (numpy only; no training)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from training.data import (
    hold_out_validation,
    load_dataset,
    locate_cifar10,
    read_cifar10,
    read_mnist,
)
from training.errors import TrainingError


def _assert_cifar_matches(data, cifar_arrays):
    x_train, y_train, x_test, y_test = cifar_arrays
    assert data.name == "cifar10"
    assert data.x_train.shape == (200, 32, 32, 3) and data.x_train.dtype == np.uint8
    np.testing.assert_array_equal(data.x_train, x_train)  # pixel order: rows of R, G, B planes → HWC
    np.testing.assert_array_equal(data.y_train, y_train)
    np.testing.assert_array_equal(data.x_test, x_test)
    np.testing.assert_array_equal(data.y_test, y_test)
    assert data.num_classes == 10 and data.pixel_max == 255.0


def test_cifar_reader_reads_the_official_batches_directory(cifar_directory, cifar_arrays):
    data = load_dataset("cifar10", data_dir=cifar_directory)
    _assert_cifar_matches(data, cifar_arrays)
    assert data.source.endswith("cifar-10-batches-py")
    # The batches directory itself is accepted as --data-dir too.
    _assert_cifar_matches(read_cifar10(locate_cifar10(cifar_directory / "cifar-10-batches-py")), cifar_arrays)


def test_cifar_reader_reads_the_tarball_without_extracting(cifar_tarball, cifar_arrays):
    _assert_cifar_matches(load_dataset("cifar10", data_dir=cifar_tarball.parent), cifar_arrays)
    _assert_cifar_matches(load_dataset("cifar10", data_dir=cifar_tarball), cifar_arrays)
    assert sorted(path.name for path in cifar_tarball.parent.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar_reader_refuses_a_pickle_that_would_run_code(cifar_directory):
    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    (cifar_directory / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(TrainingError, match="data_batch_3 is not a CIFAR-10 batch"):
        load_dataset("cifar10", data_dir=cifar_directory)


def test_cifar_reader_names_data_dir_when_files_are_missing(tmp_path):
    with pytest.raises(TrainingError, match=r"--data-dir .* holds no CIFAR-10 files: put cifar-10-batches-py/"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_mnist_reader_reads_the_official_npz(mnist_directory):
    data = load_dataset("mnist", data_dir=mnist_directory)
    with np.load(mnist_directory / "mnist.npz") as original:
        np.testing.assert_array_equal(data.x_train[..., 0], original["x_train"])
        np.testing.assert_array_equal(data.y_test, original["y_test"])
    assert data.x_train.shape == (400, 28, 28, 1) and data.image_shape == (28, 28, 1)
    assert read_mnist(mnist_directory / "mnist.npz").x_test.shape == (100, 28, 28, 1)


def test_mnist_reader_rejects_a_file_without_the_official_keys(tmp_path):
    np.savez(tmp_path / "mnist.npz", images=np.zeros((2, 28, 28)))
    with pytest.raises(TrainingError, match="not the official mnist.npz"):
        load_dataset("mnist", data_dir=tmp_path)


def test_without_network_keras_datasets_fails_with_one_line_naming_data_dir():
    # The suite runs with loopback only: the keras.datasets download cannot succeed.
    with pytest.raises(TrainingError) as caught:
        load_dataset("cifar10")
    message = str(caught.value)
    assert "could not fetch cifar10" in message and "--data-dir" in message and "\n" not in message


def test_digits_are_real_16x16_images_with_a_fixed_split():
    data = load_dataset("digits", seed=123)
    assert data.name == "digits" and data.image_shape == (16, 16, 1)
    assert (len(data.x_train), len(data.x_test)) == (1437, 360)
    assert data.x_train.max() == 16 and data.pixel_max == 16.0
    np.testing.assert_array_equal(data.y_test, load_dataset("digits", seed=7).y_test)  # the split ignores --seed


def test_synthetic_is_named_synthetic_and_follows_seed_and_shape():
    first = load_dataset("synthetic", seed=3, synthetic_shape=(28, 28, 1), limit=50)
    again = load_dataset("synthetic", seed=3, synthetic_shape=(28, 28, 1), limit=50)
    other = load_dataset("synthetic", seed=4, synthetic_shape=(28, 28, 1), limit=50)
    assert first.name == "synthetic" and "generated" in first.source
    assert first.x_train.shape == (50, 28, 28, 1) and len(first.x_test) == 50
    np.testing.assert_array_equal(first.x_train, again.x_train)
    assert not np.array_equal(first.x_train, other.x_train)


def test_hold_out_takes_the_first_or_the_last_images():
    data = load_dataset("synthetic", seed=0, limit=100)
    first = hold_out_validation(data, fraction=0.1, position="first")
    np.testing.assert_array_equal(first.x_val, data.x_train[:10])
    np.testing.assert_array_equal(first.x_train, data.x_train[10:])
    last = hold_out_validation(data, fraction=0.2, position="last")
    np.testing.assert_array_equal(last.x_val, data.x_train[80:])
    assert last.counts() == {"train": 80, "validation": 20, "test": 100}


def test_unknown_dataset_is_refused():
    with pytest.raises(TrainingError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
