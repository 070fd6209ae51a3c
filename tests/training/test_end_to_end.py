"""Every module trains end-to-end on tiny data on the CPU and writes every output; the
reloaded best model reproduces metrics.json's test accuracy; the weight counts, the real
accuracy on digits and resuming after a crash."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training import cifar10_augmentation, cifar10_cnn, cli, mnist_mlp, outputs, pipeline, transfer_learning
from training.data import Splits
from training.models import CIFAR10_CNN_WEIGHTS, MNIST_MLP_WEIGHTS, build_cnn, build_mlp, load_model

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow is not installed (pip install 'gpuflow[train]')", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    # TF 2.21's EagerTensor.__array__ predates NumPy 2's copy keyword; Keras warns on every batch.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


def read_metrics(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


def history_epochs(output: Path) -> list[int]:
    with (output / "history.csv").open(newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def assert_outputs(output: Path, *, dataset: str, epochs: int) -> dict:
    """Every output exists and metrics.json says what was run."""
    for name in ("best_model.keras", "history.csv", "metrics.json", "training_curves.png"):
        assert (output / name).is_file() and (output / name).stat().st_size > 0, name
    assert (output / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (output / "checkpoint").exists(), "a finished run leaves no checkpoint"
    metrics = read_metrics(output)
    assert metrics["dataset"] == dataset
    assert metrics["epochs_run"] == epochs and history_epochs(output) == list(range(epochs))
    for key in (
        "test_loss", "test_accuracy", "wall_time_seconds", "images_per_second", "parameter_count",
        "seed", "tensorflow_version", "keras_version", "devices",
    ):
        assert metrics[key] not in (None, "", []), key
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["images_per_second"] > 0
    return metrics


def reloaded_test_accuracy(output: Path, splits: Splits) -> float:
    """Test accuracy of best_model.keras loaded fresh, on the test split."""
    model = load_model(output / "best_model.keras")
    test = pipeline.make_dataset(
        splits.x_test, splits.y_test, num_classes=splits.num_classes, pixel_max=splits.pixel_max,
        batch_size=64, shuffle=False, seed=0,
    )
    return float(model.evaluate(test, verbose=0)[1])


def options_for(module, argv) -> cli.RunOptions:
    options, _ = cli.parse_options(module.build_parser(), argv, module.MODULE)
    return options


def test_weight_counts_are_the_courses():
    assert build_mlp((28, 28), 10).count_params() == MNIST_MLP_WEIGHTS == 669_706
    assert build_mlp((28, 28, 1), 10).count_params() == 669_706
    assert build_cnn((32, 32, 3), 10).count_params() == CIFAR10_CNN_WEIGHTS == 528_054


def test_mnist_mlp_end_to_end_from_an_official_mnist_npz(mnist_directory, tmp_path, monkeypatch):
    output = tmp_path / "mlp"
    argv = ["--data-dir", str(mnist_directory), "--epochs", "2", "--output", str(output), "--seed", "1"]
    drawn = []
    draw_curves = outputs.draw_curves
    monkeypatch.setattr(outputs, "draw_curves", lambda history, **marks: drawn.append(marks) or draw_curves(history, **marks))
    assert mnist_mlp.main(argv) == 0
    metrics = assert_outputs(output, dataset="mnist", epochs=2)
    # The curves mark the epoch best_model.keras holds and the test results measured on it.
    assert len(drawn) == 1 and metrics["best_epoch"] in (1, 2)
    assert drawn[0]["best_epoch"] == metrics["best_epoch"]
    assert (drawn[0]["test_accuracy"], drawn[0]["test_loss"]) == (metrics["test_accuracy"], metrics["test_loss"])
    assert metrics["parameter_count"] == 669_706
    assert metrics["samples"] == {"train": 320, "validation": 80, "test": 100}  # validation_split 0.2
    splits = mnist_mlp.load_data(options_for(mnist_mlp, argv))
    assert reloaded_test_accuracy(output, splits) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert metrics["test_accuracy"] > 0.5  # the stripes are easy: it learns, not guesses


def test_cifar10_cnn_end_to_end_from_the_official_tarball(cifar_tarball, tmp_path):
    output = tmp_path / "cnn"
    argv = ["--data-dir", str(cifar_tarball.parent), "--epochs", "2", "--output", str(output), "--limit", "100"]
    assert cifar10_cnn.main(argv) == 0
    metrics = assert_outputs(output, dataset="cifar10", epochs=2)
    assert metrics["parameter_count"] == 528_054
    assert metrics["samples"] == {"train": 90, "validation": 10, "test": 40}  # the first 10% held out
    splits = cifar10_cnn.load_data(options_for(cifar10_cnn, argv))
    assert reloaded_test_accuracy(output, splits) == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_cifar10_augmentation_end_to_end_on_synthetic(tmp_path):
    output = tmp_path / "augmentation"
    argv = ["--dataset", "synthetic", "--limit", "200", "--epochs", "2", "--output", str(output), "--optimizer", "adam"]
    assert cifar10_augmentation.main(argv) == 0
    metrics = assert_outputs(output, dataset="synthetic", epochs=2)
    assert metrics["module"] == "training.cifar10_augmentation" and "flip" in metrics["augmentation"]
    assert "generated" in metrics["data_source"]
    splits = cifar10_cnn.load_data(options_for(cifar10_augmentation, argv))
    assert reloaded_test_accuracy(output, splits) == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_mixed_precision_keeps_a_float32_softmax_and_is_recorded(tmp_path):
    output = tmp_path / "mixed"
    argv = ["--dataset", "synthetic", "--limit", "100", "--epochs", "1", "--mixed-precision", "--output", str(output)]
    try:
        assert mnist_mlp.main(argv) == 0
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")  # the policy is process-wide
    metrics = assert_outputs(output, dataset="synthetic", epochs=1)
    assert metrics["mixed_precision"] is True and metrics["xla"] is False
    model = load_model(output / "best_model.keras")
    assert model.layers[0].dtype_policy.name == "mixed_float16"
    assert model.layers[-1].dtype_policy.name == "float32"


def test_augmentation_changes_train_images_but_not_evaluation_images():
    images = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16) % 10
    common = {"num_classes": 10, "pixel_max": 255.0, "batch_size": 16, "shuffle": False, "seed": 0}
    plain = next(iter(pipeline.make_dataset(images, labels, **common)))[0].numpy()
    augmented = next(iter(pipeline.make_dataset(images, labels, augment=True, **common)))[0].numpy()
    np.testing.assert_allclose(plain, images / 255.0, rtol=1e-6)
    assert augmented.shape == plain.shape and not np.allclose(augmented, plain)


def test_cnn_on_digits_reaches_97_percent(tmp_path):
    output = tmp_path / "digits"
    argv = ["--dataset", "digits", "--optimizer", "adam", "--epochs", "30", "--seed", "0", "--no-tensorboard",
            "--output", str(output)]
    assert cifar10_cnn.main(argv) == 0
    metrics = read_metrics(output)
    assert metrics["dataset"] == "digits" and metrics["samples"]["test"] == 360
    assert metrics["test_accuracy"] >= 0.97, metrics["test_accuracy"]


class _Crash(RuntimeError):
    pass


def _crash_after_epoch(epochs_done: int):
    import keras

    class CrashAfterEpoch(keras.callbacks.Callback):
        """Dies at the end of an epoch, after the checkpoint has been saved (as a kill would)."""

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == epochs_done:
                raise _Crash(f"killed after epoch {epochs_done}")

    return CrashAfterEpoch()


def test_a_run_stopped_after_epoch_2_resumes_at_epoch_3(tmp_path, capsys):
    output = tmp_path / "resume"
    argv = ["--dataset", "digits", "--limit", "300", "--epochs", "4", "--optimizer", "adam", "--output", str(output)]
    with pytest.raises(_Crash):
        cifar10_cnn.train(options_for(cifar10_cnn, argv), extra_callbacks=[_crash_after_epoch(2)])
    state = json.loads((output / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["epochs_completed"]) == (3, 0, 2)
    assert history_epochs(output) == [0, 1]
    assert not (output / "metrics.json").exists()
    capsys.readouterr()

    assert cifar10_cnn.main(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "at epoch 3, step 1" in printed
    assert "Epoch 3/4" in printed and "Epoch 1/4" not in printed
    metrics = assert_outputs(output, dataset="digits", epochs=4)
    assert metrics["resumed_from_epoch"] == 2 and metrics["epochs_this_session"] == 2


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory) -> Path:
    """best_model.keras of a short training.cifar10_cnn run on digits: a pretrained base built here."""
    output = tmp_path_factory.mktemp("saved-cnn")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home-module")))
        assert cifar10_cnn.main(["--dataset", "digits", "--limit", "400", "--epochs", "2", "--optimizer", "adam",
                                 "--no-tensorboard", "--output", str(output)]) == 0
    return output / "best_model.keras"


def test_a_killed_subprocess_resumes_at_the_next_epoch(tmp_path):
    """SIGKILL a real run once its checkpoint holds epoch 2 or later; the rerun continues from there."""
    output = tmp_path / "killed"
    argv = ["--dataset", "digits", "--limit", "300", "--epochs", "12", "--optimizer", "adam", "--no-tensorboard",
            "--output", str(output)]
    repository = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cifar10_cnn", *argv],
        cwd=repository,
        env={**os.environ, "PYTHONPATH": str(repository)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metadata = output / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if _backup_epoch(metadata) >= 2:
                break
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = json.loads(metadata.read_text())
    saved_epoch = state["epochs_completed"]
    assert 2 <= saved_epoch < 12 and state["step"] == 0  # only epoch ends: the step save comes every 600 s

    assert cifar10_cnn.main(argv) == 0
    metrics = assert_outputs(output, dataset="digits", epochs=12)  # every epoch once in history.csv
    assert metrics["resumed_from_epoch"] == saved_epoch
    assert metrics["epochs_this_session"] == 12 - saved_epoch


def _backup_epoch(metadata: Path) -> int:
    """The epochs the checkpoint holds, 0 while there is none."""
    try:
        return int(json.loads(metadata.read_text())["epochs_completed"])
    except (OSError, ValueError, KeyError):
        return 0


def test_imagenet_weights_without_network_is_a_one_line_error(tmp_path, capsys):
    argv = ["--dataset", "digits", "--limit", "100", "--base", "mobilenetv2", "--output", str(tmp_path / "out")]
    assert transfer_learning.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("training: error: could not fetch the imagenet weights of mobilenetv2")
    assert "--weights PATH" in error and "\n" not in error


def test_transfer_learning_four_cases_on_the_cnn_saved_by_cifar10_cnn(saved_cnn, tmp_path):
    trainable = {}
    for case in transfer_learning.CASES:
        output = tmp_path / case
        argv = ["--dataset", "digits", "--limit", "300", "--epochs", "2", "--base-model", str(saved_cnn),
                "--case", case, "--output", str(output)]
        assert transfer_learning.main(argv) == 0, case
        metrics = assert_outputs(output, dataset="digits", epochs=2)
        assert metrics["case"] == case and metrics["base"] == str(saved_cnn)
        assert metrics["weights"] == "from the saved model" and metrics["image_size"] == [16, 16, 1]
        # small-different cuts early (2nd of 3 poolings); the others at the last feature map.
        assert metrics["cut_layer"].startswith("max_pooling2d_1" if case == "small-different" else "dropout")
        trainable[case] = metrics["trainable_parameter_count"]
        splits = transfer_learning.load_data(options_for(transfer_learning, argv))
        assert reloaded_test_accuracy(output, splits) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    # Frozen cases train only the head (GAP + Dense on 64 or 32 channels); the large cases the base too.
    assert trainable["small-similar"] == 64 * 10 + 10
    assert trainable["small-different"] == 32 * 10 + 10
    convolutions = 80 + 2_080 + 8_256
    assert trainable["large-similar"] == trainable["large-different"] == convolutions + 64 * 10 + 10
    # Frozen means frozen: the saved transfer models carry the base's first kernel unchanged
    # in the small cases; fine-tuning moved it in the large ones.
    original = first_conv_kernel(load_model(saved_cnn))
    for case in transfer_learning.CASES:
        kernel = first_conv_kernel(load_model(tmp_path / case / "best_model.keras"))
        assert np.array_equal(kernel, original) == (case in transfer_learning.FROZEN_CASES), case


def first_conv_kernel(model) -> np.ndarray:
    """The kernel of the first Conv2D, looking inside nested models."""
    for layer in model.layers:
        if type(layer).__name__ == "Conv2D":
            return np.asarray(layer.kernel)
        if hasattr(layer, "layers"):
            found = first_conv_kernel(layer)
            if found is not None:
                return found
    return None


def test_a_damaged_base_model_is_a_one_line_error(tmp_path, capsys):
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(b"not a zip archive")
    argv = ["--dataset", "digits", "--limit", "100", "--base-model", str(damaged), "--output", str(tmp_path / "out")]
    assert transfer_learning.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"training: error: cannot load --base-model {damaged}")


def test_bottleneck_on_the_saved_cnn(saved_cnn, tmp_path):
    output = tmp_path / "bottleneck-cnn"
    argv = ["--dataset", "digits", "--limit", "300", "--epochs", "3", "--base-model", str(saved_cnn),
            "--bottleneck", "--case", "small-different", "--output", str(output)]
    assert transfer_learning.main(argv) == 0
    metrics = assert_outputs(output, dataset="digits", epochs=3)
    assert metrics["feature_shape"] == [4, 4, 32] and metrics["parameter_count"] == 32 * 10 + 10


def _count_writes_of(name: str, monkeypatch) -> list[str]:
    """Records each time a file called ``name`` is written or replaced (Path.write_text,
    Path.write_bytes, open for writing, os.replace / os.rename onto it)."""
    import builtins
    import io as io_module

    writes: list[str] = []

    def spy(function, how, target_of):
        def wrapped(*args, **kwargs):
            target = target_of(*args, **kwargs)
            if target is not None and Path(target).name == name:
                writes.append(how)
            return function(*args, **kwargs)
        return wrapped

    def opened_for_writing(file, mode="r", *args, **kwargs):
        return file if isinstance(file, (str, Path)) and any(flag in mode for flag in "wax+") else None

    monkeypatch.setattr(Path, "write_text", spy(Path.write_text, "write_text", lambda self, *a, **k: self))
    monkeypatch.setattr(Path, "write_bytes", spy(Path.write_bytes, "write_bytes", lambda self, *a, **k: self))
    monkeypatch.setattr(builtins, "open", spy(builtins.open, "open", opened_for_writing))
    monkeypatch.setattr(io_module, "open", spy(io_module.open, "open", opened_for_writing))
    monkeypatch.setattr(os, "replace", spy(os.replace, "replace", lambda source, target, **k: target))
    monkeypatch.setattr(os, "rename", spy(os.rename, "rename", lambda source, target, **k: target))
    return writes


def test_keras_applications_base_from_a_local_weights_file(mobilenet_weights, tmp_path, monkeypatch):
    """MobileNetV2 with a weights file built here: grey 16x16 digits → RGB 32x32, ImageNet preprocessing in the model."""
    output = tmp_path / "mobilenet"
    argv = ["--dataset", "digits", "--limit", "120", "--epochs", "1", "--base", "mobilenetv2",
            "--weights", str(mobilenet_weights), "--case", "small-similar", "--output", str(output)]
    writes = _count_writes_of("metrics.json", monkeypatch)
    assert transfer_learning.main(argv) == 0
    # Written once, complete (with the base's description), in one step: never rewritten after.
    assert writes == ["replace"], writes
    metrics = assert_outputs(output, dataset="digits", epochs=1)
    assert metrics["base"] == "mobilenetv2" and metrics["cut_layer"] == "out_relu"
    assert metrics["image_size"] == [32, 32, 3] and metrics["trainable_parameter_count"] == 1280 * 10 + 10
    splits = transfer_learning.load_data(options_for(transfer_learning, argv))
    assert reloaded_test_accuracy(output, splits) == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_bottleneck_features_are_extracted_once_and_reused(mobilenet_weights, tmp_path):
    output = tmp_path / "bottleneck"
    argv = ["--dataset", "digits", "--limit", "120", "--epochs", "2", "--base", "mobilenetv2",
            "--weights", str(mobilenet_weights), "--bottleneck", "--output", str(output)]
    assert transfer_learning.main(argv) == 0
    metrics = assert_outputs(output, dataset="digits", epochs=2)
    assert metrics["bottleneck"] is True and metrics["features_reused"] is False
    assert metrics["feature_shape"] == [1, 1, 1280] and metrics["parameter_count"] == 1280 * 10 + 10
    with np.load(output / "bottleneck_features.npz") as features:
        assert features["x_train"].shape == (108, 1, 1, 1280) and features["x_test"].shape == (120, 1, 1, 1280)
        feature_splits = Splits(
            name="digits", source="features", x_train=features["x_train"], y_train=features["y_train"],
            x_val=features["x_val"], y_val=features["y_val"], x_test=features["x_test"], y_test=features["y_test"],
            num_classes=10, pixel_max=1.0,
        )
    assert reloaded_test_accuracy(output, feature_splits) == pytest.approx(metrics["test_accuracy"], abs=1e-6)

    assert transfer_learning.main(argv) == 0
    assert read_metrics(output)["features_reused"] is True


@pytest.mark.parametrize("base, layer", [("vgg16", "block5_pool"), ("resnet50", "conv5_block3_out")])
def test_keras_applications_bases_have_their_cut_layers(base, layer):
    import keras

    spec = transfer_learning.BASES[base]
    model = getattr(keras.applications, spec["application"])(include_top=False, weights=None, input_shape=(32, 32, 3))
    assert spec["full"] == layer
    for cut in ("full", "early"):
        assert len(model.get_layer(spec[cut]).output.shape) == 4
    assert model.get_layer(spec["full"]).output.shape[1:3] == (1, 1)
