"""The course models by name, and the loader for the models these modules save.

Each model is defined in its own module, where the student reads it
(:func:`training.mnist_mlp.build_model`, :func:`training.cifar10_cnn.build_model`);
this module names them for other code (benchmarks, tests) and loads saved ones.
Keras is imported inside the functions so that importing :mod:`training` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from training.cifar10_cnn import build_model as build_cnn
from training.mnist_mlp import build_model as build_mlp

MNIST_MLP_WEIGHTS = 669_706  # on 28x28 inputs, 10 classes
CIFAR10_CNN_WEIGHTS = 528_054  # on 32x32x3 inputs, 10 classes

__all__ = ["CIFAR10_CNN_WEIGHTS", "MNIST_MLP_WEIGHTS", "build_cnn", "build_mlp", "load_model"]


def load_model(path: Path):
    """Load a ``.keras`` model written by any training module (incl. its custom layers)."""
    from training.layers import load_model as load  # imports Keras

    return load(path)
