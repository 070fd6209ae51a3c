"""A finished run's checkpoint (every epoch done) restored again -- what a node relaunched by `run --recover`
after the last epoch's checkpoint was committed does -- loads the model and finishes, instead of refusing
the checkpoint as "a different model" because its optimizer state is compared with an unbuilt optimizer."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow is not installed (pip install 'gpuflow[train]')", allow_module_level=True)

ARGS = ["--dataset", "digits", "--limit", "80", "--epochs", "1", "--batch-size", "16", "--seed", "0",
        "--deterministic", "--save-every-steps", "2", "--no-tensorboard"]


def test_the_finished_checkpoint_is_restored_and_the_run_ends_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    output = tmp_path / "outputs"
    command = [sys.executable, "-m", "training.cifar10_cnn", *ARGS, "--output", str(output)]
    keep = ("import runpy, sys, training.checkpoint as c; c.remove = lambda *a, **k: None; "  # the node went after
            "runpy.run_module('training.cifar10_cnn', run_name='__main__')")
    first = subprocess.run([sys.executable, "-c", keep, *command[3:]], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (output / "checkpoint").is_dir()
    for path in output.iterdir():  # a new node: only the checkpoint restored from S3
        if path.name != "checkpoint":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "different model" not in again.stderr
    assert json.loads((output / "metrics.json").read_text())["test_accuracy"] >= 0
