"""Old import path of the training helpers (bench/train_throughput.py uses it): see
training.cli, training.session, training.callbacks and training.outputs."""

# SHIM: removed after the restructure merge
from training.session import describe_devices, import_tensorflow

__all__ = ["describe_devices", "import_tensorflow"]
