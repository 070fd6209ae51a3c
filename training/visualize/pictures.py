"""The pictures: filters, feature maps, activation maximisation, saliency, CAM, the
confusion matrix and the most confident mistakes (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from training.visualize.maps import heat
from training.visualize.maximization import Maximized
from training.visualize.probe import Probe, Step

MAX_FEATURE_LAYERS = 8
MAX_CHANNELS = 32
MIN_TILE_PIXELS = 16  # small maps and kernels are enlarged (nearest) to at least this


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)


def show_image(axis, image: np.ndarray) -> None:
    """An image in [0, 1]: grey with a grey colour map, colour as RGB."""
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axis.imshow(np.clip(image[..., :3], 0.0, 1.0), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def enlarge(tiles: np.ndarray) -> np.ndarray:
    """(n, h, w[, c]) tiles enlarged by an integer factor to at least MIN_TILE_PIXELS (nearest)."""
    factor = max(1, math.ceil(MIN_TILE_PIXELS / max(tiles.shape[1], tiles.shape[2])))
    return np.repeat(np.repeat(tiles, factor, axis=1), factor, axis=2)


def mosaic(tiles: np.ndarray, columns: int, fill: float = np.nan) -> np.ndarray:
    """(n, h, w[, c]) tiles as one image, ``columns`` wide, one ``fill`` pixel between tiles."""
    count, height, width = tiles.shape[:3]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1, *tiles.shape[3:]), fill, dtype=np.float32)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid[row * (height + 1) : row * (height + 1) + height, column * (width + 1) : column * (width + 1) + width] = tile
    return grid


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def _caffe_preprocessing(probe: Probe, before: Step) -> bool:
    """True when the model turns RGB into BGR (ImageNet "caffe" mode) before ``before``."""
    for step in probe.steps[: probe.steps.index(before)]:
        if step.kind == "ImagenetPreprocessing" and getattr(step.layer, "mode", None) == "caffe":
            return True
    return False


def plot_filters(probe: Probe, path: Path, title: str) -> dict:
    """The first Conv2D's kernels: RGB when it reads 3 channels, else a diverging colour map."""
    pyplot = _pyplot()
    first = next((step for step in probe.convolutions if step.kind == "Conv2D"), probe.convolutions[0])
    kernel = np.asarray(first.layer.kernel, dtype=np.float32)  # (kh, kw, in, out); depthwise (kh, kw, in, 1)
    if first.kind != "Conv2D":
        kernel = np.transpose(kernel, (0, 1, 3, 2))[..., :1, :]
    kh, kw, channels, count = kernel.shape
    tiles = np.transpose(kernel, (3, 0, 1, 2))[:MAX_CHANNELS * 2]  # (out, kh, kw, in)
    scale = float(np.abs(tiles).max()) or 1.0
    shown = "" if len(tiles) == count else f", first {len(tiles)} shown"
    if channels == 3:
        if _caffe_preprocessing(probe, first):
            tiles = tiles[..., ::-1]  # these kernels read BGR: show them as RGB
        grid = mosaic(enlarge(0.5 + 0.5 * tiles / scale), 16, fill=1.0)
        note = f"RGB: mid-grey = 0, full colour = ±{scale:.2g}"
    else:
        grid = mosaic(enlarge(tiles[..., 0] if channels == 1 else tiles.mean(axis=-1)), 16)
        note = "one input channel" if channels == 1 else f"mean over the {channels} input channels"
    figure, axis = pyplot.subplots(figsize=(10, 1.4 + 8.0 * grid.shape[0] / grid.shape[1]), layout="constrained")
    if channels == 3:
        axis.imshow(grid, interpolation="nearest")
    else:
        colours = pyplot.get_cmap("RdBu_r").with_extremes(bad="white")
        drawn = axis.imshow(grid, cmap=colours, vmin=-scale, vmax=scale, interpolation="nearest")
        figure.colorbar(drawn, ax=axis, fraction=0.03, pad=0.02, label="weight")
    axis.set_title(f"{first.layer.name}: {count} kernels of {kh}x{kw}x{channels}{shown} ({note})", fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
    figure.suptitle(f"First-layer filters — {title}", fontsize=11)
    _save(figure, path)
    return {"layer": first.layer.name, "kernels": int(count), "kernel_shape": [int(kh), int(kw), int(channels)]}


def plot_feature_maps(probe: Probe, image: np.ndarray, label: str, path: Path, title: str) -> dict:
    """One image's activations after each convolution / pooling layer (at most MAX_FEATURE_LAYERS)."""
    pyplot = _pyplot()
    steps = probe.feature_steps
    if len(steps) > MAX_FEATURE_LAYERS:
        picks = np.linspace(0, len(steps) - 1, MAX_FEATURE_LAYERS).round().astype(int)
        steps = [steps[index] for index in sorted(set(picks))]
    maps, _, _ = probe.run(image[None], steps)
    rows = []
    for step, feature_map in zip(steps, maps):
        values = np.asarray(feature_map, dtype=np.float32)[0]
        channels = values.shape[-1]
        shown = np.transpose(values[..., :MAX_CHANNELS], (2, 0, 1))
        grid = mosaic(enlarge(shown), 16)
        rows.append((step, values, channels, grid))
    heights = [2.2] + [0.5 + 9.0 * grid.shape[0] / grid.shape[1] for *_, grid in rows]
    figure, axes = pyplot.subplots(
        len(heights), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False,
        layout="constrained",
    )
    axes = axes[:, 0]
    show_image(axes[0], image)
    axes[0].set_title(f"input image ({label})", fontsize=10)
    colours = pyplot.get_cmap("viridis").with_extremes(bad="white")
    for axis, (step, values, channels, grid) in zip(axes[1:], rows):
        low, high = float(values.min()), float(values.max())
        drawn = axis.imshow(grid, cmap=colours, vmin=low, vmax=high if high > low else low + 1e-6, interpolation="nearest")
        figure.colorbar(drawn, ax=axis, fraction=0.02, pad=0.01, label="activation")
        height, width = values.shape[:2]
        shown = f"{channels} channels" if channels <= MAX_CHANNELS else f"first {MAX_CHANNELS} of {channels} channels"
        axis.set_title(f"{step.layer.name} ({step.kind}): {height}x{width}x{channels} — {shown}", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    layers_note = "" if len(steps) == len(probe.feature_steps) else f" ({len(steps)} of {len(probe.feature_steps)} layers)"
    figure.suptitle(f"Feature maps{layers_note} — {title}")
    _save(figure, path)
    return {"layers": [step.layer.name for step in steps]}


def plot_maximization(
    filters: Maximized | None, filter_ids: Sequence[int], layer: str | None,
    classes: Maximized, class_ids: Sequence[int], names: Sequence[str], steps: int, path: Path, title: str,
) -> None:
    pyplot = _pyplot()
    rows = ([("filter", filters, filter_ids)] if filters is not None else []) + [("class", classes, class_ids)]
    columns = max(len(ids) for _, _, ids in rows)
    figure, axes = pyplot.subplots(
        len(rows), columns, figsize=(1.45 * columns + 0.5, 1.9 * len(rows) + 0.9), squeeze=False, layout="constrained"
    )
    for row, (kind, result, ids) in enumerate(rows):
        for column in range(columns):
            axis = axes[row, column]
            axis.axis("off")
            if column >= len(ids):
                continue
            image = result.images[column]
            low, high = float(image.min()), float(image.max())
            show_image(axis, (image - low) / (high - low) if high > low else image)
            if kind == "filter":
                axis.set_title(f"filter {ids[column]}\n{result.start[column]:.2g} → {result.end[column]:.2g}", fontsize=8)
            else:
                axis.set_title(
                    f"class {names[ids[column]]}\nlogit {result.start[column]:.2g} → {result.end[column]:.2g}", fontsize=8
                )
    what = f"filters of {layer} (mean activation: noise → after)" if filters is not None else ""
    rows_note = "top: " + what + "; bottom: class scores" if filters is not None else "class scores (no convolution layer)"
    figure.suptitle(
        f"Activation maximisation, {steps} gradient-ascent steps from noise — {title}\n"
        f"{rows_note}; each image contrast-stretched",
        fontsize=9,
    )
    _save(figure, path)


def _label(names: Sequence[str], predicted: int, true: int, confidence: float) -> str:
    return f"pred {names[predicted]} ({confidence:.0%})\ntrue {names[true]}"


def plot_saliency(images, rows, labels, predictions, confidences, names, path: Path, title: str) -> None:
    """Each image above its saliency maps; ``rows``: (method label, (N, H, W) maps) per row."""
    pyplot = _pyplot()
    count = len(images)
    figure, axes = pyplot.subplots(
        1 + len(rows), count, figsize=(1.6 * count + 1.4, 0.4 + 1.9 * (1 + len(rows))), squeeze=False, layout="constrained"
    )
    for column in range(count):
        show_image(axes[0, column], images[column])
        axes[0, column].set_title(_label(names, predictions[column], labels[column], confidences[column]), fontsize=8)
    axes[0, 0].set_ylabel("image", fontsize=9)
    for row, (method, maps) in enumerate(rows, start=1):
        scaled = heat(maps)
        for column in range(count):
            drawn = axes[row, column].imshow(scaled[column], cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[row, 0].set_ylabel(method, fontsize=9)
        figure.colorbar(drawn, ax=axes[row, :].tolist(), fraction=0.02, pad=0.01, label="value / the map's max")
    figure.suptitle(f"Saliency of the predicted class's logit — {title}", fontsize=10)
    _save(figure, path)


def plot_cam(images, heats, method: str, layer: str, map_shape, labels, predictions, confidences, names, path, title):
    pyplot = _pyplot()
    count = len(images)
    figure, axes = pyplot.subplots(2, count, figsize=(1.6 * count + 1.4, 4.2), squeeze=False, layout="constrained")
    for column in range(count):
        show_image(axes[0, column], images[column])
        axes[0, column].set_title(_label(names, predictions[column], labels[column], confidences[column]), fontsize=8)
        grey = images[column].mean(axis=-1)
        axes[1, column].imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        drawn = axes[1, column].imshow(heats[column], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
        axes[1, column].set_xticks([])
        axes[1, column].set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel(method, fontsize=9)
    figure.colorbar(drawn, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label=f"{method} / max")
    formula = "sum_k w_k A_k" if method == "CAM" else "ReLU(sum_k alpha_k A_k)"
    figure.suptitle(
        f"{method} ({formula}) of the predicted class on {layer} ({map_shape[0]}x{map_shape[1]}, "
        f"each cell drawn at the centre of what it sees) — {title}",
        fontsize=10,
    )
    _save(figure, path)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    pyplot = _pyplot()
    count = len(names)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    side = max(4.5, 0.5 * count + 1.5)
    figure, axes = pyplot.subplots(1, 2, figsize=(2 * side + 1.5, side), layout="constrained")
    for axis, values, label, number in (
        (axes[0], matrix, "images", "{:d}"),
        (axes[1], normalised, "fraction of the true class", "{:.2f}"),
    ):
        drawn = axis.imshow(values, cmap="Blues", vmin=0, vmax=None if values is matrix else 1.0)
        figure.colorbar(drawn, ax=axis, fraction=0.046, pad=0.04, label=label)
        axis.set_xticks(range(count), names, rotation=45 if max(len(name) for name in names) > 2 else 0, ha="right" if max(len(name) for name in names) > 2 else "center")
        axis.set_yticks(range(count), names)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        if count <= 20:
            threshold = values.max() / 2 if values.max() else 1
            for row in range(count):
                for column in range(count):
                    value = values[row, column]
                    if matrix[row, column] == 0:
                        continue  # blank cells stay blank: the mistakes stand out
                    axis.text(
                        column, row, number.format(int(value) if values is matrix else value), ha="center",
                        va="center", fontsize=9 if count <= 10 else 7, color="white" if value > threshold else "black",
                    )
    axes[0].set_title("counts")
    axes[1].set_title("row-normalised (recall on the diagonal)")
    figure.suptitle(f"Confusion matrix on {int(matrix.sum())} test images — {title}")
    _save(figure, path)


def plot_misclassified(images, labels, predictions, confidences, names, mistakes: int, total: int, path: Path, title: str) -> None:
    pyplot = _pyplot()
    count = len(images)
    if count == 0:
        figure, axis = pyplot.subplots(figsize=(6, 2), layout="constrained")
        axis.axis("off")
        axis.text(0.5, 0.5, f"no misclassified images among the {total} test images", ha="center", va="center")
    else:
        rows, columns = _grid(count, 8)
        figure, axes = pyplot.subplots(
            rows, columns, figsize=(1.6 * columns + 0.4, 2.0 * rows + 0.6), squeeze=False, layout="constrained"
        )
        for index, axis in enumerate(axes.flat):
            axis.axis("off")
            if index < count:
                show_image(axis, images[index])
                axis.set_title(_label(names, predictions[index], labels[index], confidences[index]), fontsize=8)
    figure.suptitle(f"The {count} most confident of {mistakes} mistakes on {total} test images — {title}", fontsize=10)
    _save(figure, path)
