"""training.visualize: every picture for a CNN, an MLP and a transfer model; CAM is exact;
CAM, Grad-CAM and saliency localise a pattern whose place is known; activation
maximisation climbs; bad input is one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training import cifar10_cnn, mnist_mlp, transfer_learning, visualize
from training.visualize.maps import SMOOTHGRAD_SPREAD

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow is not installed (pip install 'gpuflow[train]')", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

REPOSITORY = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """Module fixtures run before the autouse KERAS_HOME fixture: keep Keras out of ~ here too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home-visualize")))
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        yield


@pytest.fixture(scope="module")
def digits_cnn(keras_home, tmp_path_factory) -> Path:
    """training.cifar10_cnn on digits with --visualize: its output directory."""
    output = tmp_path_factory.mktemp("digits-cnn")
    argv = ["--dataset", "digits", "--limit", "500", "--epochs", "4", "--optimizer", "adam", "--visualize",
            "--no-tensorboard", "--output", str(output)]
    assert cifar10_cnn.main(argv) == 0
    return output


@pytest.fixture(scope="module")
def digits_mlp(keras_home, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("digits-mlp")
    assert mnist_mlp.main(["--dataset", "digits", "--limit", "500", "--epochs", "3", "--no-tensorboard",
                           "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def transfer_model(keras_home, tmp_path_factory) -> Path:
    """A GAP + Dense head on a small RGB base built here (grey digits are repeated to RGB)."""
    import keras

    directory = tmp_path_factory.mktemp("transfer")
    layers = keras.layers
    base = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
        ],
        name="small_base",
    )
    base.save(directory / "base.keras")
    output = directory / "model"
    argv = ["--dataset", "digits", "--limit", "300", "--epochs", "2", "--base-model", str(directory / "base.keras"),
            "--case", "large-different", "--no-tensorboard", "--output", str(output)]
    assert transfer_learning.main(argv) == 0
    return output


def assert_pictures(directory: Path, expected: tuple[str, ...]) -> dict:
    for name in visualize.PICTURES:
        path = directory / name
        if name in expected:
            assert path.read_bytes()[:8] == PNG and path.stat().st_size > 3_000, name
        else:
            assert not path.exists(), name
    report = json.loads((directory / "visualization.json").read_text())
    assert sorted(report["pictures"]) == sorted(expected)
    return report


def assert_consistent_metrics(report: dict) -> None:
    """Per-class precision / recall agree with the confusion matrix and the accuracy."""
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == report["test_images"]
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    for row in report["per_class"]:
        index = row["class"]
        assert row["support"] == matrix[index].sum()
        assert row["recall"] == pytest.approx(matrix[index, index] / matrix[index].sum())
        if matrix[:, index].sum():
            assert row["precision"] == pytest.approx(matrix[index, index] / matrix[:, index].sum())


# --------------------------------------------------------------------------- every picture


def test_a_digits_cnn_trained_with_visualize_gets_every_picture(digits_cnn):
    metrics = json.loads((digits_cnn / "metrics.json").read_text())
    assert metrics["visualization"] == "visualization/"
    report = assert_pictures(digits_cnn / "visualization", visualize.PICTURES)
    assert report["skipped"] == {}
    assert report["dataset"] == "digits" and report["test_images"] == 360
    # The same best model on the same test images: the same accuracy as metrics.json's.
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert_consistent_metrics(report)
    assert report["cam"] == {"method": "Grad-CAM", "layer": "conv2d_2", "feature_map_shape": [4, 4, 64]}
    assert report["saliency"]["reported"] == "smoothgrad"  # the first row of saliency.png
    assert report["saliency"]["smoothgrad"] == {
        "what": "|mean of d logit / d pixel over noisy copies|, largest over the colour channels",
        "samples": 25, "noise_sigma_of_pixel_range": 0.15, "seed": 0,
    }
    assert report["filters"] == {"layer": "conv2d", "kernels": 16, "kernel_shape": [2, 2, 1]}
    assert report["feature_maps"]["layers"] == [
        "conv2d", "max_pooling2d", "conv2d_1", "max_pooling2d_1", "conv2d_2", "max_pooling2d_2"
    ]


def test_a_digits_mlp_skips_the_convolution_pictures_with_a_note(digits_mlp, capsys):
    output = digits_mlp / "pictures"
    # No --dataset: it is read from the metrics.json beside the model.
    assert visualize.main([str(digits_mlp / "best_model.keras"), "--images", "5", "--steps", "20", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    report = assert_pictures(output, ("activation_maximization.png", "saliency.png", "confusion_matrix.png", "misclassified.png"))
    assert set(report["skipped"]) == {"filters.png", "feature_maps.png", "cam.png"}
    assert "skipped filters.png: the model has no convolution layer" in printed
    assert report["dataset"] == "digits" and "filters" not in report["activation_maximization"]
    assert len(report["activation_maximization"]["classes"]) == 10
    assert_consistent_metrics(report)


def test_a_transfer_model_gets_every_picture_and_true_cam(transfer_model, capsys):
    assert visualize.main([str(transfer_model / "best_model.keras"), "--steps", "20", "--images", "4"]) == 0
    report = assert_pictures(transfer_model / "visualization", visualize.PICTURES)
    # The base is a nested model: its layers are inlined, the head's GAP makes CAM apply.
    assert report["cam"]["method"] == "CAM" and report["cam"]["feature_map_shape"] == [8, 8, 16]
    assert report["filters"]["kernel_shape"] == [3, 3, 3]
    assert len(report["feature_maps"]["layers"]) == 3
    assert_consistent_metrics(report)
    assert f"pictures in {transfer_model / 'visualization'}" in capsys.readouterr().out


# --------------------------------------------------------------------------- CAM is exact


def test_cam_plus_bias_is_the_logit(transfer_model):
    """mean_ij(sum_k w[k, c] A_ijk) + b_c == logit_c, and softmax(logits) is the model's own output."""
    from training.data import load_dataset
    from training.models import load_model

    model = load_model(transfer_model / "best_model.keras")
    digits = load_dataset("digits")
    images = digits.x_test[:40].astype(np.float32) / digits.pixel_max
    probe = visualize.Probe(model)
    logits, probabilities = probe.predict(images)
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-6)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(exp / exp.sum(axis=1, keepdims=True), probabilities, atol=1e-6)
    bias = np.asarray(probe.classifier.layer.bias)
    for label in range(10):
        classes = np.full(len(images), label)
        cams = visualize.class_activation_maps(probe, images, classes)
        assert cams.shape == (40, 8, 8)
        assert np.abs(cams.mean(axis=(1, 2)) + bias[label] - logits[:, label]).max() <= 1e-4


def test_smoothgrad_averages_the_signed_gradient_over_noisy_copies(keras_home):
    """A linear model's gradient is the same everywhere: SmoothGrad equals the plain
    gradient |W_c|; through a ReLU the noise changes it, reproducibly by seed."""
    import keras

    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, (5, 4, 4, 3)).astype(np.float32)
    classes = np.array([0, 1, 2, 0, 1])
    linear = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    probe = visualize.Probe(linear)
    kernel = np.asarray(linear.layers[-1].kernel)  # (48, 3), flattened (row, column, channel)
    expected = np.abs(kernel[:, classes].T.reshape(5, 4, 4, 3)).max(axis=-1)
    np.testing.assert_allclose(visualize.saliency_maps(probe, images, classes), expected, atol=1e-6)
    np.testing.assert_allclose(visualize.smoothgrad_maps(probe, images, classes, samples=4), expected, atol=1e-6)

    keras.utils.set_random_seed(0)
    layers = keras.layers
    relu = keras.Sequential(
        [keras.Input((4, 4, 3)), layers.Conv2D(8, 2, activation="relu"), layers.Flatten(), layers.Dense(3, activation="softmax")]
    )
    probe = visualize.Probe(relu)
    plain = visualize.saliency_maps(probe, images, classes)
    smooth = visualize.smoothgrad_maps(probe, images, classes, samples=8, seed=1)
    assert smooth.shape == plain.shape == (5, 4, 4) and not np.allclose(smooth, plain, atol=1e-4)
    np.testing.assert_array_equal(smooth, visualize.smoothgrad_maps(probe, images, classes, samples=8, seed=1))
    with pytest.raises(ValueError, match="at least one noisy copy"):
        visualize.smoothgrad_maps(probe, images, classes, samples=0)


# --------------------------------------------------------------------------- activation maximisation


def test_activation_maximization_raises_each_chosen_filter_tenfold(digits_cnn):
    """Measured with a plain Keras sub-model (not the probe that climbed): >= 10x the noise's."""
    import keras

    from training.data import load_dataset
    from training.models import load_model

    model = load_model(digits_cnn / "best_model.keras")
    layer = model.get_layer("conv2d_2")
    measure = keras.Model(model.inputs, layer.output)
    digits = load_dataset("digits")
    images = digits.x_test.astype(np.float32) / digits.pixel_max
    probe = visualize.Probe(model)
    centre = float(np.median(images))
    filters = visualize.selective_filters(probe, probe.gradcam_step, images, 4, seed=0, centre=centre)
    assert len(filters) == 4
    objective = visualize.filter_objective(probe, probe.gradcam_step, filters)
    result = visualize.maximize(objective, images.shape[1:], len(filters), steps=visualize.DEFAULT_STEPS, seed=0, centre=centre)
    noise = visualize.starting_noise(images.shape[1:], 0, centre)
    before = measure.predict(noise[None], verbose=0)[0].mean(axis=(0, 1))[filters]
    after = measure.predict(result.images, verbose=0).mean(axis=(1, 2))[np.arange(len(filters)), filters]
    assert np.all(before > 0) and np.all(after >= 10 * before), (before, after)
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0
    # What visualization.json reported for the --visualize run holds too.
    report = json.loads((digits_cnn / "visualization" / "visualization.json").read_text())
    reported = report["activation_maximization"]["filters"]
    assert len(reported) == visualize.MAXIMIZED_FILTERS
    assert all(row["end_mean_activation"] >= 10 * row["start_mean_activation"] > 0 for row in reported)
    classes = report["activation_maximization"]["classes"]
    assert all(row["end_logit"] > row["start_logit"] for row in classes)


# --------------------------------------------------------------------------- bad input


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("training: error: ")
    return lines[0]


@pytest.mark.parametrize("content", [b"not a zip archive", b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_not_a_keras_model(content, tmp_path, capsys):
    bogus = tmp_path / "best_model.keras"
    bogus.write_bytes(content)
    assert visualize.main([str(bogus), "--dataset", "digits", "--output", str(tmp_path / "out")]) == 2
    assert f"cannot load {bogus} as a Keras model" in one_error_line(capsys)


def test_a_dataset_whose_images_do_not_fit_the_model(digits_cnn, mnist_directory, tmp_path, capsys):
    model = str(digits_cnn / "best_model.keras")
    argv = [model, "--dataset", "mnist", "--data-dir", str(mnist_directory), "--output", str(tmp_path / "out")]
    assert visualize.main(argv) == 2
    line = one_error_line(capsys)
    assert "the model takes inputs of shape (16, 16, 1) but mnist's images are (28, 28, 1)" in line
    assert "pass the --dataset the model was trained on" in line


def run_module(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.visualize", *arguments],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )


def test_option_errors_are_one_line_before_tensorflow(tmp_path):
    model = tmp_path / "best_model.keras"
    model.write_bytes(b"x")
    cases = [
        ((str(model), "--images", "0", "--dataset", "digits"), "--images: must be > 0, got 0"),
        ((str(model), "--steps", "-3", "--dataset", "digits"), "--steps: must be > 0, got -3"),
        ((str(model), "--dataset", "imagenet"), "invalid choice: 'imagenet'"),
        ((str(tmp_path / "missing.keras"), "--dataset", "digits"), "missing.keras: no such model file"),
        ((str(model),), "no metrics.json beside"),
        ((str(model), "--dataset", "digits", "--data-dir", str(tmp_path)), "--data-dir is only read for cifar10 and mnist"),
    ]
    for arguments, expected in cases:
        result = run_module(*arguments, "--output", str(tmp_path / "out"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and lines[0].startswith("training: error: ") and expected in lines[0], lines
    assert not (tmp_path / "out").exists(), "a rejected command creates no output directory"


# --------------------------------------------------------------------------- localisation

# The localisation test set: four classes of 8x8 pattern, drawn 2x (16x16); each 32x32
# image holds one pattern filling one of its four quadrants, on uniform noise in
# [0, 0.2] (pattern pixels 0.8-1.0); the class does not tell the quadrant.  At 32 px the
# course CNN's last convolution is 8x8 (4x4 cells per quadrant); at 16 px it was 4x4 and
# the upsampled Grad-CAM spilled over the quadrant's edge (>= 0.7 for 58% of images).
QUADRANT_SIDE = 32
QUADRANT_NOISE = 0.2
# Heat counted: the part of a map above 20% of its maximum (the CAM paper's localisation
# threshold; below it the picture is background).  Figures per seed in README;
# VISUALIZE_QUADRANT_SEED=N (default 0) trains and measures with another seed.
HEAT_THRESHOLD = 0.2
QUADRANT_SEED = int(os.environ.get("VISUALIZE_QUADRANT_SEED", "0"))
# Measuring (the variable set): also the maps no assertion needs, for README's table.
MEASURING = "VISUALIZE_QUADRANT_SEED" in os.environ


def quadrant_patterns() -> np.ndarray:
    patterns = np.zeros((4, 8, 8), dtype=np.float32)
    patterns[0, 3:5, 1:7] = patterns[0, 1:7, 3:5] = 1  # plus
    inner = np.eye(6, dtype=bool)
    patterns[1, 1:7, 1:7][inner | inner[::-1]] = 1  # cross
    patterns[2, [1, 6], 1:7] = 1
    patterns[2, 1:7, [1, 6]] = 1  # ring
    patterns[3, [1, 2, 5, 6], 1:7] = 1  # two bars
    scale = QUADRANT_SIDE // 16
    return np.repeat(np.repeat(patterns, scale, axis=1), scale, axis=2)


def quadrant_images(count: int, seed: int):
    """(images 32x32x1 in [0, 1], labels, quadrant of each pattern: 0 top-left .. 3 bottom-right)."""
    rng = np.random.default_rng(seed)
    patterns = quadrant_patterns()
    half = QUADRANT_SIDE // 2
    labels = rng.integers(0, 4, count)
    quadrants = rng.integers(0, 4, count)
    images = rng.uniform(0.0, QUADRANT_NOISE, (count, QUADRANT_SIDE, QUADRANT_SIDE, 1)).astype(np.float32)
    for index in range(count):
        top, left = half * (quadrants[index] // 2), half * (quadrants[index] % 2)
        window = images[index, top : top + half, left : left + half, 0]
        bright = rng.uniform(0.8, 1.0, (half, half)).astype(np.float32)
        images[index, top : top + half, left : left + half, 0] = np.where(patterns[labels[index]] > 0, bright, window)
    return images, labels, quadrants


def fraction_in_quadrant(heat: np.ndarray, quadrant: int, threshold: float = HEAT_THRESHOLD) -> float:
    """Share of the heat above ``threshold`` x its maximum that lies in ``quadrant``."""
    counted = np.where(heat >= threshold * heat.max(), heat, 0.0)
    row, column = divmod(int(quadrant), 2)
    height, width = heat.shape
    inside = counted[row * height // 2 : (row + 1) * height // 2, column * width // 2 : (column + 1) * width // 2]
    return float(inside.sum() / counted.sum()) if counted.sum() > 0 else 0.0


def fractions(maps: np.ndarray, quadrants: np.ndarray, threshold: float = HEAT_THRESHOLD) -> np.ndarray:
    return np.array([fraction_in_quadrant(heat, quadrant, threshold) for heat, quadrant in zip(maps, quadrants)])


def gap_model(keras):
    """A GAP + Dense model whose last map keeps spatial resolution, as in the CAM paper
    (Zhou et al. 2016 cut VGG's last layers to keep 14x14): 8x8 cells of 4x4 pixels at
    32 px, 4x4 per quadrant; each cell sees 26 px, enough for a whole 16 px pattern.
    Trained with the Gaussian noise SmoothGrad adds to look at it (Smilkov et al. 2017,
    section 4.2; inert at inference): trained on the quadrant noise alone, the model was
    silent on that noise only, SmoothGrad's noisy copies woke its 48 noise cells and
    their gradients hid the pattern's (seed 0: 50% of the images met the bar; README)."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((QUADRANT_SIDE, QUADRANT_SIDE, 1)),
            layers.GaussianNoise(SMOOTHGRAD_SPREAD),  # x the images' pixel range, 1
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4, activation="softmax"),
        ],
        name="gap_cnn",
    )


# Pattern-free images (noise only) trained towards the uniform answer, 1 per 4 pattern
# images: without them a GAP model may tell one class by the absence of the others'
# patterns, and its CAM then has nothing in the pattern's quadrant to point at (README).
BLANK_IMAGES = 250


def with_blank_images(images: np.ndarray, targets: np.ndarray, count: int, seed: int):
    rng = np.random.default_rng(seed)
    blank = rng.uniform(0.0, QUADRANT_NOISE, (count, *images.shape[1:])).astype(np.float32)
    images = np.concatenate([images, blank])
    targets = np.concatenate([targets, np.full((count, targets.shape[1]), 1.0 / targets.shape[1], dtype=np.float32)])
    order = rng.permutation(len(images))
    return images[order], targets[order]


def builds(keras):
    """The two models localised: the course CNN (Flatten head: Grad-CAM), a GAP model (CAM)."""
    from training.models import build_cnn

    return {"Grad-CAM": build_cnn((QUADRANT_SIDE, QUADRANT_SIDE, 1), 4), "CAM": gap_model(keras)}


@pytest.fixture(scope="module")
def quadrant_models(keras_home):
    """The two models trained on quadrant images, and the same builds untrained (the control)."""
    import keras

    keras.utils.set_random_seed(QUADRANT_SEED)
    untrained = builds(keras)
    keras.utils.set_random_seed(QUADRANT_SEED)
    models = builds(keras)
    images, labels, _ = quadrant_images(1000, seed=2 * QUADRANT_SEED)
    targets = keras.utils.to_categorical(labels, 4)
    for method, model in models.items():
        x, y = (images, targets) if method == "Grad-CAM" else with_blank_images(images, targets, BLANK_IMAGES, 3 * QUADRANT_SEED + 7)
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    return models, untrained


@pytest.mark.parametrize("method", ["Grad-CAM", "CAM"])
def test_cam_and_saliency_find_the_quadrant_that_holds_the_pattern(quadrant_models, method):
    """The issue's bars, on the correctly classified test images: >= 70% of the heat in the
    pattern's quadrant for >= 80% of the images (Grad-CAM, CAM), >= 60% for the saliency
    saliency.png reports (SmoothGrad) on both models; and because of the training, not
    the data."""
    trained, untrained = quadrant_models
    images, labels, quadrants = quadrant_images(200, seed=2 * QUADRANT_SEED + 1)
    probe = visualize.Probe(trained[method])
    _, probabilities = probe.predict(images)
    right = probabilities.argmax(axis=1) == labels
    assert right.mean() >= 0.9
    right_images, right_labels, right_quadrants = images[right], labels[right], quadrants[right]
    found, heats = visualize.localisation_maps(probe, right_images, right_labels)
    assert found == method and heats.shape == (len(right_images), QUADRANT_SIDE, QUADRANT_SIDE)
    maps = {method: heats, "SmoothGrad": visualize.smoothgrad_maps(probe, right_images, right_labels, seed=QUADRANT_SEED)}
    if method == "Grad-CAM" or MEASURING:  # the GAP model's plain gradient is not asserted (README)
        maps["gradient"] = visualize.saliency_maps(probe, right_images, right_labels)
    # Model randomisation check (Adebayo et al. 2018): the same build with its initial
    # weights, all the images, the true class.  The pattern is brighter than the noise, so
    # untrained maps already lean to it (README); the trained ones must do far better.
    control = visualize.Probe(untrained[method])
    chance = {
        method: visualize.localisation_maps(control, images, labels)[1],
        "SmoothGrad": visualize.smoothgrad_maps(control, images, labels, seed=QUADRANT_SEED),
    }
    share = {name: fractions(found_maps, right_quadrants) for name, found_maps in maps.items()}
    chance_share = {name: fractions(found_maps, quadrants) for name, found_maps in chance.items()}
    met = {}
    for name, bar in ((method, 0.7), ("SmoothGrad", 0.6), ("gradient", 0.6))[: len(maps)]:
        raw = fractions(maps[name], right_quadrants, threshold=0.0)
        met[name] = np.mean(share[name] >= bar)
        untrained_note = f"; untrained {np.mean(chance_share[name] >= bar):.0%}" if name in chance_share else ""
        print(f"seed {QUADRANT_SEED} {method} model, {name}: median {np.median(share[name]):.2f}, "
              f">= {bar} for {met[name]:.0%} (all heat: {np.median(raw):.2f}, {np.mean(raw >= bar):.0%}){untrained_note}")
    assert met[method] >= 0.8
    # Control: the quadrant opposite the pattern gets little of the heat.
    assert np.median(fractions(heats, 3 - right_quadrants)) <= 0.1
    assert met[method] - np.mean(chance_share[method] >= 0.7) >= 0.25
    # The saliency reported meets the bar on both models, because of the training.
    assert met["SmoothGrad"] >= 0.8
    assert met["SmoothGrad"] - np.mean(chance_share["SmoothGrad"] >= 0.6) >= 0.3
    if method == "Grad-CAM":
        # The plain gradient (drawn below SmoothGrad, not reported) does not meet it
        # (README), but it points at the pattern more than chance (0.25), less than SmoothGrad.
        assert 0.45 <= np.median(share["gradient"]) < np.median(share["SmoothGrad"])
