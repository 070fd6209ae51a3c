"""Bad input through ``python -m training.<module>``: one line on stderr, non-zero exit, no traceback.

These fail before TensorFlow is imported, so each subprocess takes well under a second.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
MODULES = ("mnist_mlp", "cifar10_cnn", "cifar10_augmentation", "transfer_learning")


def run_module(module: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"training.{module}", *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("training: error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("module", MODULES)
def test_unknown_dataset(module, tmp_path):
    result = run_module(module, "--dataset", "imagenet22k", "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "invalid choice: 'imagenet22k'")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (("--epochs", "0"), "--epochs: must be > 0, got 0"),
        (("--epochs", "ten"), "--epochs: expected a whole number > 0, got 'ten'"),
        (("--batch-size", "-32"), "--batch-size: must be > 0, got -32"),
        (("--learning-rate", "0"), "--learning-rate: must be a finite number > 0"),
        (("--learning-rate", "nan"), "--learning-rate: must be a finite number > 0"),
        (("--limit", "0"), "--limit: must be > 0, got 0"),
        (("--seed", "-1"), "--seed: must be >= 0, got -1"),
        (("--optimizer", "lbfgs"), "invalid choice: 'lbfgs'"),
    ],
)
def test_nonsense_numbers_and_choices(arguments, expected, tmp_path):
    result = run_module("cifar10_cnn", *arguments, "--output", str(tmp_path / "out"))
    assert_one_line_error(result, expected)


def test_missing_data_dir_files(tmp_path):
    result = run_module("cifar10_cnn", "--data-dir", str(tmp_path), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, f"--data-dir {tmp_path} holds no CIFAR-10 files")
    result = run_module("mnist_mlp", "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "holds no mnist.npz")
    result = run_module("mnist_mlp", "--dataset", "digits", "--data-dir", str(tmp_path), "--output", str(tmp_path / "o"))
    assert_one_line_error(result, "--data-dir is only read for cifar10 and mnist")


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="Keras is not installed (pip install 'gpuflow[train]')")
def test_no_network_and_no_data_dir_ends_in_one_error_line(tmp_path):
    # Loopback only: keras.datasets cannot download.  TensorFlow's own start-up chatter
    # may precede it on stderr; the error itself is the last line, without a traceback.
    result = run_module("mnist_mlp", "--output", str(tmp_path / "out"))
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line.startswith("training: error: could not fetch mnist through keras.datasets")
    assert last_line.endswith("pass --data-dir DIR where DIR holds mnist.npz (" + "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz)")


def test_output_that_cannot_be_written(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    for output in (a_file, a_file / "below"):
        result = run_module("mnist_mlp", "--dataset", "digits", "--output", str(output))
        assert_one_line_error(result, f"cannot write to --output {output}")


def test_transfer_learning_option_errors(tmp_path):
    output = ("--output", str(tmp_path / "out"))
    assert_one_line_error(
        run_module("transfer_learning", "--weights", str(tmp_path / "missing.h5"), *output), "missing.h5: no such file"
    )
    assert_one_line_error(
        run_module("transfer_learning", "--case", "large-similar", "--bottleneck", *output), "--bottleneck needs a frozen base"
    )
    assert_one_line_error(
        run_module("transfer_learning", "--base-model", str(tmp_path / "cnn.h5"), *output), "is not a .keras file"
    )
    assert_one_line_error(run_module("transfer_learning", "--case", "medium", *output), "invalid choice: 'medium'")
    assert_one_line_error(run_module("transfer_learning", "--image-size", "16", *output), "--image-size must be at least 32")
    assert_one_line_error(
        run_module("transfer_learning", "--bottleneck", "--visualize", *output), "--visualize needs a model that takes images"
    )
    assert not (tmp_path / "out").exists(), "a rejected command creates no output directory"


def test_help_works_and_importing_the_modules_imports_neither_tensorflow_nor_gpuflow():
    result = run_module("transfer_learning", "--help")
    assert result.returncode == 0 and "--bottleneck" in result.stdout and "--case" in result.stdout
    probe = (
        "import sys, training.mnist_mlp, training.cifar10_cnn, training.cifar10_augmentation, "
        "training.transfer_learning, training.cli, training.session, training.callbacks, training.outputs, "
        "training.data, training.pipeline, training.models, training.visualize, training.visualize.command\n"
        "heavy = sorted(name for name in ('tensorflow', 'keras', 'gpuflow', 'sklearn', 'matplotlib') if name in sys.modules)\n"
        "print(heavy)"
    )
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPOSITORY, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"


def test_no_training_source_imports_gpuflow_or_infra():
    """training/ runs on instances where only TensorFlow is installed: no gpuflow, no infra
    (every file, in every subpackage, function-level imports included)."""
    sources = sorted((REPOSITORY / "training").rglob("*.py"))
    assert len(sources) > 10 and any(path.parent.name == "visualize" for path in sources)
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"  # absolute names only, checked below
                names = [node.module]
            assert not any(name.split(".")[0] in ("gpuflow", "infra") for name in names), f"{path} imports {names}"


def test_a_random_bytes_cifar_tarball_is_one_error_line(tmp_path):
    """Issue 10 item 14: it was five lines (tarfile's list of the compressions it tried)."""
    tarball = tmp_path / "data" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    tarball.write_bytes(os.urandom(50_000))
    result = run_module("cifar10_cnn", "--data-dir", str(tarball.parent), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, f"{tarball} is not a readable cifar-10-python.tar.gz")
    assert result.returncode == 2 and "download it again" in result.stderr
