"""A training run's outputs read back without TensorFlow, for the tests that compare two runs
(the resume and determinism oracles, the multi-worker parity): history.csv's rows and every
array a saved ``.keras`` file holds.  One reader of each, shared."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np

# history.csv's wall-clock columns: they differ from run to run, whatever was trained.
TIMING = ("epoch_seconds", "train_seconds")


def history(outputs: Path, *, timing: bool = False) -> list[dict[str, str]]:
    """``outputs/history.csv``, one dict per epoch (its text as written), without the TIMING columns
    unless ``timing``."""
    with (outputs / "history.csv").open(newline="") as handle:
        return [{key: value for key, value in row.items() if timing or key not in TIMING}
                for row in csv.DictReader(handle)]


def saved_arrays(keras_file: Path) -> dict[str, np.ndarray]:
    """Every array of ``keras_file`` (the ``model.weights.h5`` in its zip) by its HDF5 name: the
    layers' weights and, where saved, the optimizer's state.  Read from the file, not through a
    loaded model (whose dropout seed generators are drawn anew at load)."""
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(keras_file) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as h5:
        h5.visititems(lambda name, item: arrays.__setitem__(name, np.array(item))
                      if isinstance(item, h5py.Dataset) else None)
    return arrays
