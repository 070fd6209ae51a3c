"""Training modules write TensorBoard logs (--tensorboard, on by default): the epoch scalars read back from the event files."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tensorboard") is None:
    pytest.skip("TensorFlow and TensorBoard are not installed (pip install 'gpuflow[test]')", allow_module_level=True)

REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


def scalar_tags(directory: Path) -> dict[str, list[int]]:
    """Every scalar tag in the event files under ``directory``, with the steps it was written at."""
    import tensorflow as tf

    tags: dict[str, list[int]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(f"{path.parent.name}/{value.tag}", []).append(event.step)
    return tags


def test_a_digits_run_writes_epoch_scalars(tmp_path):
    # As a process, as gpuflow runs it (and with no Keras/TensorFlow state left by other tests in this worker).
    output = tmp_path / "run"
    common = ["--dataset", "digits", "--epochs", "2", "--limit", "200", "--batch-size", "50"]
    argv = [sys.executable, "-m", "training.mnist_mlp", *common, "--output", str(output), "--tensorboard-every-steps", "2"]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "KERAS_HOME": str(tmp_path / "keras-home")}
    finished = subprocess.run(argv, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    tags = scalar_tags(output / "tensorboard")
    assert sorted(tags["train/epoch_loss"]) == [0, 1] and sorted(tags["validation/epoch_loss"]) == [0, 1]
    assert "train/epoch_accuracy" in tags and "validation/epoch_accuracy" in tags
    assert not any("histogram" in tag for tag in tags)

    assert "train/batch_loss" in tags  # every --tensorboard-every-steps steps
    assert model_graph_written(output / "tensorboard" / "train")  # the graph (TensorBoard's Graphs tab)


def model_graph_written(directory: Path) -> bool:
    """Keras' model graph (the Graphs tab's conceptual graph; Keras 3 writes no op-level graph of its train step)."""
    import tensorflow as tf

    return any(value.metadata.plugin_data.plugin_name == "graph_keras_model"
               for path in directory.glob("events.out.tfevents.*")
               for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value)


def test_no_tensorboard_adds_no_callback(tmp_path):
    from training import cli
    from training.callbacks import tensorboard_callbacks

    parser = cli.build_parser("training.mnist_mlp", "", default_dataset="digits", default_epochs=1,
                              default_batch_size=8, default_optimizer="adam", default_learning_rate=None)
    quiet, _ = cli.parse_options(parser, ["--output", str(tmp_path / "q"), "--no-tensorboard"], "training.mnist_mlp")
    loud, _ = cli.parse_options(parser, ["--output", str(tmp_path / "l")], "training.mnist_mlp")
    assert tensorboard_callbacks(quiet, tmp_path / "q") == []
    [callback] = tensorboard_callbacks(loud, tmp_path / "l")
    assert callback.log_dir == str(tmp_path / "l" / "tensorboard") and callback.histogram_freq == 0
