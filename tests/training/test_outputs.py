"""training.outputs without training: the curves mark the epoch best_model.keras holds and
the test results; metrics.json is replaced in one step (matplotlib only, no TensorFlow)."""

from __future__ import annotations

import json
import math

import pytest

from training import outputs
from training.callbacks import best_epoch

pytest.importorskip("matplotlib")


def history(val_losses: list[float]) -> list[dict[str, float]]:
    return [
        {"epoch": float(index), "loss": 1.0 / (index + 1), "accuracy": 0.5 + index / 100, "val_loss": value,
         "val_accuracy": 0.6 + index / 100}
        for index, value in enumerate(val_losses)
    ]


def marks_of(figure) -> dict[str, list[tuple]]:
    """gid -> [(axis title (its y label), x data, y data)] of every line that has a gid."""
    found: dict[str, list[tuple]] = {}
    for axis in figure.axes:
        for line in axis.get_lines():
            if line.get_gid():
                found.setdefault(line.get_gid(), []).append(
                    (axis.get_ylabel(), list(map(float, line.get_xdata())), list(map(float, line.get_ydata())),
                     line.get_label())
                )
    return found


def legend_texts(figure) -> list[str]:
    return [text.get_text() for axis in figure.axes for text in axis.get_legend().get_texts()]


def test_curves_mark_the_best_epoch_and_the_test_results():
    rows = history([0.9, 0.7, 0.4, 0.5, 0.6])  # lowest val_loss at the 3rd epoch
    assert best_epoch(rows) == 3
    figure = outputs.draw_curves(rows, title="t", best_epoch=3, test_loss=0.4321, test_accuracy=0.8765)
    marks = marks_of(figure)
    # A vertical line at epoch 3 on both plots...
    lines = marks[outputs.BEST_EPOCH_MARK]
    assert sorted(axis for axis, *_ in lines) == ["accuracy", "loss"]
    assert all(xs == [3.0, 3.0] for _, xs, _, _ in lines)
    # ... and a star there at the test accuracy (accuracy plot) and the test loss (loss plot).
    ((axis, xs, ys, label),) = marks["test-accuracy"]
    assert axis == "accuracy" and xs == [3.0] and ys == [pytest.approx(0.8765)] and "87.65%" in label
    ((axis, xs, ys, label),) = marks["test-loss"]
    assert axis == "loss" and xs == [3.0] and ys == [pytest.approx(0.4321)]
    assert any("epoch 3: best_model.keras" in text for text in legend_texts(figure))
    assert any("test accuracy 87.65%" in text for text in legend_texts(figure))


def test_without_a_finite_val_loss_the_last_epoch_is_marked_as_what_best_model_holds():
    rows = history([math.nan, math.inf, math.nan])
    assert best_epoch(rows) is None  # no checkpoint: best_model.keras holds the last weights
    figure = outputs.draw_curves(rows, title="t", best_epoch=None, test_loss=2.3, test_accuracy=0.1)
    marks = marks_of(figure)
    assert all(xs == [3.0, 3.0] for _, xs, _, _ in marks[outputs.BEST_EPOCH_MARK])
    assert marks["test-accuracy"][0][1:3] == ([3.0], [pytest.approx(0.1)])
    assert any("last epoch (no finite val_loss)" in text for text in legend_texts(figure))


def test_best_epoch_is_the_first_of_equal_losses_as_the_checkpoint_keeps_it():
    assert best_epoch(history([0.5, 0.3, 0.3, 0.4])) == 2
    assert best_epoch([]) is None


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "curves.png"
    outputs.plot_curves(history([0.5, 0.4]), path, title="t", best_epoch=2, test_loss=0.4, test_accuracy=0.9)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_json_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    outputs.write_json(path, {"test_accuracy": 0.5})
    assert json.loads(path.read_text()) == {"test_accuracy": 0.5}
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["metrics.json"]
