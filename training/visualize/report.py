"""Everything about one model on one set of test images: the predictions, the metrics,
each picture and ``visualization.json`` (:func:`visualize_model`), also at the end of a
training run (:func:`after_training`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from training.cli import RunOptions
from training.data import Splits
from training.errors import TrainingError
from training.outputs import VISUALIZATION_DIRECTORY
from training.visualize.maps import (
    SMOOTHGRAD_SAMPLES,
    SMOOTHGRAD_SPREAD,
    localisation_maps,
    saliency_maps,
    smoothgrad_maps,
)
from training.visualize.maximization import (
    class_objective,
    filter_objective,
    maximize,
    selective_filters,
    stacked_objective,
)
from training.visualize.pictures import (
    plot_cam,
    plot_confusion,
    plot_feature_maps,
    plot_filters,
    plot_maximization,
    plot_misclassified,
    plot_saliency,
)
from training.visualize.probe import Probe

MODULE = "training.visualize"
REPORT_FILE = "visualization.json"
PICTURES = (
    "filters.png",
    "feature_maps.png",
    "activation_maximization.png",
    "saliency.png",
    "cam.png",
    "confusion_matrix.png",
    "misclassified.png",
)
CONV_PICTURES = ("filters.png", "feature_maps.png", "cam.png")

DEFAULT_IMAGES = 8
DEFAULT_STEPS = 150
MAXIMIZED_FILTERS = 8
MAXIMIZED_CLASSES = 10

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Test images in [0, 1] (float32, NHWC), their labels and the class names."""

    name: str
    source: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def class_names(dataset: str, num_classes: int) -> tuple[str, ...]:
    if dataset == "cifar10" and num_classes == len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(str(index) for index in range(num_classes))


def image_set(name: str, source: str, x_test, y_test, pixel_max: float, num_classes: int, limit: int | None = None):
    images = np.asarray(x_test[:limit], dtype=np.float32) / float(pixel_max)
    return ImageSet(name, source, images, np.asarray(y_test[:limit], dtype=np.int64), class_names(name, num_classes))


def check_fits(model, data: ImageSet) -> None:
    """The dataset's images and classes must be what the model was trained on."""
    expected = tuple(int(size) for size in model.inputs[0].shape[1:])
    found = tuple(int(size) for size in data.images.shape[1:])
    if expected != found:
        raise TrainingError(
            f"the model takes inputs of shape {expected} but {data.name}'s images are {found}: "
            "pass the --dataset the model was trained on (a --bottleneck head takes features, not images)"
        )
    classes = int(model.outputs[0].shape[-1])
    if classes != len(data.class_names):
        raise TrainingError(
            f"the model has {classes} classes but {data.name} has {len(data.class_names)}: "
            "pass the --dataset the model was trained on"
        )
    if len(data.images) == 0:
        raise TrainingError(f"{data.name} has no test images to look at")


def per_class_metrics(matrix: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Precision, recall and F1 per class (null where undefined: no images predicted / present)."""
    rows = []
    for index, name in enumerate(names):
        true_positive = int(matrix[index, index])
        predicted = int(matrix[:, index].sum())
        actual = int(matrix[index, :].sum())
        precision = true_positive / predicted if predicted else None
        recall = true_positive / actual if actual else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else (0.0 if precision is not None and recall is not None else None)
        )
        rows.append(
            {"class": index, "name": name, "precision": precision, "recall": recall, "f1": f1, "support": actual}
        )
    return rows


def visualize_model(
    model,
    data: ImageSet,
    output: Path,
    *,
    images: int = DEFAULT_IMAGES,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    model_name: str = "",
    say=print,
) -> dict:
    """Write every picture and visualization.json into ``output``; returns the report."""
    check_fits(model, data)
    output.mkdir(parents=True, exist_ok=True)
    probe = Probe(model)
    names = data.class_names
    title = f"{model_name or model.name} on {data.name}"

    logits, probabilities = probe.predict(data.images)
    predictions = probabilities.argmax(axis=1)
    confidences = probabilities.max(axis=1)
    count = len(names)
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (data.labels, predictions), 1)
    report: dict = {
        "module": MODULE,
        "model": model_name or model.name,
        "dataset": data.name,
        "data_source": data.source,
        "test_images": int(len(data.images)),
        "input_shape": list(data.images.shape[1:]),
        "class_names": list(names),
        "accuracy": float((predictions == data.labels).mean()),
        "per_class": per_class_metrics(matrix, names),
        "confusion_matrix": matrix.tolist(),
        "class_scores": f"logits of {probe.classifier.layer.name} (before its softmax)",
        "pictures": {},
        "skipped": {},
    }
    shown = slice(0, images)
    sample, sample_labels = data.images[shown], data.labels[shown]
    sample_predictions, sample_confidences = predictions[shown], confidences[shown]
    label_args = (sample_labels, sample_predictions, sample_confidences, names)

    def written(name: str, what: str) -> None:
        report["pictures"][name] = what
        say(f"training: wrote {output / name}")

    if probe.convolutions:
        report["filters"] = plot_filters(probe, output / "filters.png", title)
        written("filters.png", "the first convolution's kernels")
        first_label = f"pred {names[predictions[0]]}, true {names[data.labels[0]]}"
        report["feature_maps"] = plot_feature_maps(probe, data.images[0], first_label, output / "feature_maps.png", title)
        written("feature_maps.png", "one test image's activations after each convolution / pooling layer")
    else:
        for name in ("filters.png", "feature_maps.png"):
            report["skipped"][name] = "the model has no convolution layer"

    class_ids = list(range(min(count, MAXIMIZED_CLASSES)))
    centre = float(np.median(data.images))  # the typical background pixel: black for digits, grey for CIFAR-10
    filter_ids, layer = [], None
    maximization = {"steps": steps, "seed": seed, "start": f"uniform noise of +-0.05 around {centre:.3f} (the median pixel)"}
    if probe.convolutions:
        target = probe.gradcam_step
        layer = target.layer.name
        filter_ids = selective_filters(probe, target, data.images[:256], MAXIMIZED_FILTERS, seed, centre)
    # One ascent for both rows (one graph to trace): the filters' images first, then the classes'.
    objective = stacked_objective(
        filter_objective(probe, probe.gradcam_step, filter_ids) if filter_ids else None,
        len(filter_ids),
        class_objective(probe, class_ids),
    )
    ascended = maximize(objective, data.images.shape[1:], len(filter_ids) + len(class_ids), steps=steps, seed=seed, centre=centre)
    filters = ascended.part(slice(0, len(filter_ids))) if filter_ids else None
    classes = ascended.part(slice(len(filter_ids), None))
    if filters is not None:
        maximization["layer"] = layer
        maximization["filters"] = [
            {"filter": k, "start_mean_activation": float(a), "end_mean_activation": float(b)}
            for k, a, b in zip(filter_ids, filters.start, filters.end)
        ]
    maximization["classes"] = [
        {"class": names[c], "start_logit": float(a), "end_logit": float(b)}
        for c, a, b in zip(class_ids, classes.start, classes.end)
    ]
    report["activation_maximization"] = maximization
    plot_maximization(
        filters, filter_ids, layer, classes, class_ids, names, steps, output / "activation_maximization.png", title
    )
    written("activation_maximization.png", "inputs that maximise filters of the last convolution and each class score")

    # The saliency reported (first row) is SmoothGrad; the plain gradient is drawn beside
    # it: on noise it flickers in sign from pixel to pixel and does not localise (README).
    rows = (
        (
            f"saliency: SmoothGrad\n{SMOOTHGRAD_SAMPLES} copies, noise {SMOOTHGRAD_SPREAD:.0%}",
            smoothgrad_maps(probe, sample, sample_predictions, seed=seed),
        ),
        ("plain gradient\n|d logit / d pixel|", saliency_maps(probe, sample, sample_predictions)),
    )
    report["saliency"] = {
        "reported": "smoothgrad",
        "gradient": "|d logit / d pixel| of the predicted class, largest over the colour channels",
        "smoothgrad": {
            "what": "|mean of d logit / d pixel over noisy copies|, largest over the colour channels",
            "samples": SMOOTHGRAD_SAMPLES,
            "noise_sigma_of_pixel_range": SMOOTHGRAD_SPREAD,
            "seed": seed,
        },
    }
    plot_saliency(sample, rows, *label_args, output / "saliency.png", title)
    written("saliency.png", "|d class score / d input| of the predicted class: SmoothGrad (reported) and the plain gradient")

    if probe.cam_step is not None or probe.gradcam_step is not None:
        method, heats = localisation_maps(probe, sample, sample_predictions)
        step = probe.cam_step if method == "CAM" else probe.gradcam_step
        map_shape = [int(size) for size in step.output.shape[1:]]
        report["cam"] = {"method": method, "layer": step.layer.name, "feature_map_shape": map_shape}
        plot_cam(sample, heats, method, step.layer.name, map_shape, *label_args, output / "cam.png", title)
        written("cam.png", f"{method} of the predicted class over the image")
    else:
        report["skipped"]["cam.png"] = "the model has no convolution layer (neither CAM nor Grad-CAM applies)"

    plot_confusion(matrix, names, output / "confusion_matrix.png", title)
    written("confusion_matrix.png", "counts and row-normalised")
    wrong = np.flatnonzero(predictions != data.labels)
    worst = wrong[np.argsort(-confidences[wrong], kind="stable")][:images]
    plot_misclassified(
        data.images[worst], data.labels[worst], predictions[worst], confidences[worst], names, len(wrong), len(data.images),
        output / "misclassified.png", title,
    )
    written("misclassified.png", "the most confident mistakes")
    report["misclassified"] = int(len(wrong))
    for name, reason in report["skipped"].items():
        say(f"training: skipped {name}: {reason}")
    partial = output / f".{REPORT_FILE}.part"
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, output / REPORT_FILE)  # a reader never sees half a report
    return report


def after_training(best_model, splits: Splits, options: RunOptions) -> dict:
    """``--visualize``: the pictures of a just-trained best model on its test images, in
    ``<output>/visualization/``."""
    test = image_set(splits.name, splits.source, splits.x_test, splits.y_test, splits.pixel_max, splits.num_classes)
    return visualize_model(
        best_model, test, options.output / VISUALIZATION_DIRECTORY, seed=options.seed,
        model_name=f"{options.module} best model",
    )
