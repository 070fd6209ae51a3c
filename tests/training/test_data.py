"""The dataset readers and splits (numpy only; no training)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
from pathlib import Path

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

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def _python2_batch(images, labels, name: str) -> bytes:
    """A batch as the official files are: Python 2 cPickle, protocol 2 (str as
    BINSTRING, no _codecs), the array reconstructed through numpy.core.multiarray."""

    class Python2Pickler(pickle._Pickler):
        def save_bytes(self, obj):
            header = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else pickle.BINSTRING + struct.pack("<i", len(obj))
            self.write(header + obj)
            self.memoize(obj)

        dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}

    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump({
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(rows, dtype=np.uint8),
        b"filenames": [f"image_{index}.png".encode() for index in range(len(images))],
    })
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _globals(raw: bytes) -> set[str]:
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}


def test_cifar_reader_reads_batches_in_the_official_python2_format(cifar_directory, cifar_arrays):
    x_train, y_train, x_test, y_test = cifar_arrays
    batches = cifar_directory / "cifar-10-batches-py"
    for index in range(5):
        part = slice(index * 40, (index + 1) * 40)
        raw = _python2_batch(x_train[part], y_train[part], f"training batch {index + 1} of 5")
        assert _globals(raw) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
        (batches / f"data_batch_{index + 1}").write_bytes(raw)
    (batches / "test_batch").write_bytes(_python2_batch(x_test, y_test, "testing batch 1 of 1"))
    _assert_cifar_matches(load_dataset("cifar10", data_dir=cifar_directory), cifar_arrays)


# Every global here is refused, with one line and exit 2, before its module is imported.
REFUSED_GLOBALS = [
    ("numpy.f2py.__main__", "ndarray"),  # importing it runs f2py's command line
    ("numpy.f2py.__main__", "_reconstruct"),
    ("numpy.f2py", "main"),
    ("numpy.distutils", "dtype"),
    ("numpy.testing", "ndarray"),
    ("numpy", "load"),
    ("numpy", "fromfile"),
    ("numpy.lib.npyio", "load"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("os", "system"),
    ("builtins", "eval"),
    ("__builtin__", "eval"),
    ("builtins", "bytearray"),
    ("_codecs", "decode"),
    ("subprocess", "Popen"),
    ("pickle", "loads"),
]

_REFUSAL_DRIVER = """
import contextlib, io, json, sys
from pathlib import Path
from training import cifar10_cnn
batch, argv, cases = Path(sys.argv[1]), sys.argv[2:], json.loads(sys.stdin.read())
baseline = set(sys.modules)
results = []
for stream in cases:
    batch.write_bytes(bytes.fromhex(stream))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cifar10_cnn.main(argv)
    results.append({"code": code, "stderr": stderr.getvalue(), "imported": sorted(set(sys.modules) - baseline)})
print(json.dumps(results))
"""


def _global_stream(module: str, name: str, protocol: int) -> bytes:
    """A pickle whose first opcode names ``module.name`` (GLOBAL, or STACK_GLOBAL from protocol 4)."""
    if protocol == 2:
        return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    return (b"\x80\x04\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)])
            + name.encode() + b"\x93)R.")


def test_cifar_reader_refuses_every_other_global_before_importing_it(cifar_directory, tmp_path):
    cases = [(module, name, protocol) for module, name in REFUSED_GLOBALS for protocol in (2, 4)]
    completed = subprocess.run(
        [sys.executable, "-c", _REFUSAL_DRIVER, str(cifar_directory / "cifar-10-batches-py" / "data_batch_1"),
         "--dataset", "cifar10", "--data-dir", str(cifar_directory), "--output", str(tmp_path / "out"), "--epochs", "1"],
        input=json.dumps([_global_stream(*case).hex() for case in cases]),
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "KERAS_HOME": str(tmp_path / "keras")},
    )
    assert completed.returncode == 0 and completed.stdout.strip(), completed.stdout[-2000:] + completed.stderr[-2000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for (module, name, protocol), result in zip(cases, results):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2, (module, name, protocol, result)
        assert len(lines) == 1 and lines[0].startswith("training: error: "), (module, name, protocol, result)
        assert f"global {module}.{name} is not allowed" in lines[0] and "data_batch_1" in lines[0]
        # Nothing was imported to refuse it: neither the module named, nor TensorFlow.
        assert module not in result["imported"] and "numpy.f2py" not in result["imported"], (module, name, result)
        assert not any(loaded.startswith(("tensorflow", "keras")) for loaded in result["imported"])


def test_cifar_reader_refuses_codecs_encode_other_than_latin1(cifar_directory):
    batch = cifar_directory / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(TrainingError, match="data_batch_2 is not a CIFAR-10 batch.*latin1"):
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


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="Keras is not installed (pip install 'gpuflow[train]')")
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


# --------------------------------------------------------------------------- damaged files: one line each

# Pickle streams that made the unpickler raise other errors than UnpicklingError (found by fuzzing).
FRAME_TOO_LONG = bytes.fromhex("80029524dcf0f22f6c99e4ff6ec5e6bf3d07405e6f1925ddfd56b7f5580181870e001f")
HUGE_LENGTH = bytes.fromhex("80028e6fa6d437d1443f082553f7b6ec102c447d2dee61b16b4ffa4947e51af846")


def _assert_one_line_naming(error: TrainingError, path: Path, *, advice: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message and advice in message, message


def _damaged_tarballs(good: bytes) -> dict[str, bytes]:
    import gzip

    rng = np.random.default_rng(5)
    flipped = bytearray(good)
    middle = len(flipped) // 2
    flipped[middle : middle + 64] = rng.bytes(64)
    return {
        "random bytes": rng.bytes(20_000),
        "gzip of random bytes": gzip.compress(rng.bytes(20_000)),
        "truncated": good[: len(good) // 2],
        "bytes changed in the middle": bytes(flipped),
        "empty": b"",
    }


@pytest.mark.parametrize("damage", ["random bytes", "gzip of random bytes", "truncated", "bytes changed in the middle", "empty"])
def test_a_damaged_cifar_tarball_is_one_line_naming_it(damage, cifar_tarball):
    cifar_tarball.write_bytes(_damaged_tarballs(cifar_tarball.read_bytes())[damage])
    with pytest.raises(TrainingError) as caught:
        load_dataset("cifar10", data_dir=cifar_tarball.parent)
    _assert_one_line_naming(caught.value, cifar_tarball, advice="download it again")


@pytest.mark.parametrize("content", [FRAME_TOO_LONG, HUGE_LENGTH, b"", b"\x80\x02", b"random bytes, not a pickle"])
def test_a_damaged_cifar_batch_is_one_line_naming_it(content, cifar_directory):
    batch = cifar_directory / "cifar-10-batches-py" / "data_batch_4"
    batch.write_bytes(content)
    with pytest.raises(TrainingError) as caught:
        load_dataset("cifar10", data_dir=cifar_directory)
    _assert_one_line_naming(caught.value, batch, advice="download")


@pytest.mark.parametrize("damage", ["random bytes", "a zip signature then random bytes", "truncated", "empty"])
def test_a_damaged_mnist_npz_is_one_line_naming_it(damage, mnist_directory):
    path = mnist_directory / "mnist.npz"
    good = path.read_bytes()
    rng = np.random.default_rng(6)
    path.write_bytes({
        "random bytes": rng.bytes(5_000),
        "a zip signature then random bytes": b"PK\x03\x04" + rng.bytes(5_000),
        "truncated": good[: len(good) // 2],
        "empty": b"",
    }[damage])
    with pytest.raises(TrainingError) as caught:
        load_dataset("mnist", data_dir=mnist_directory)
    _assert_one_line_naming(caught.value, path, advice="download it again")


def test_an_mnist_npz_with_a_damaged_member_is_one_line(mnist_directory):
    """A valid zip directory whose compressed member is damaged (zlib / CRC errors while reading)."""
    path = mnist_directory / "mnist.npz"
    raw = bytearray(path.read_bytes())
    start = raw.index(b"x_train.npy") + len(b"x_train.npy") + 200  # inside the first member's data
    raw[start : start + 200] = np.random.default_rng(7).bytes(200)
    path.write_bytes(bytes(raw))
    with pytest.raises(TrainingError) as caught:
        load_dataset("mnist", data_dir=mnist_directory)
    _assert_one_line_naming(caught.value, path, advice="download it again")
