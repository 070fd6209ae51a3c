"""A training module without the tensorboard package says so in one line and trains on (no TensorFlow needed here)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from training.callbacks import tensorboard_callbacks


def test_without_tensorboard_one_line_and_no_callback(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec answers None
    options = SimpleNamespace(tensorboard=True, tensorboard_every_steps=50, tensorboard_histograms=False)

    assert tensorboard_callbacks(options, tmp_path) == []

    out = capsys.readouterr().out
    assert out.splitlines() == [
        "training: no TensorBoard logs: the tensorboard package is not installed (pip install tensorboard)"
    ]
    assert not (tmp_path / "tensorboard").exists()
