"""TensorFlow set-up for one training run: seed, precision policy, distribution strategy, optimizer.

Imports TensorFlow only inside its functions (importing :mod:`training` stays cheap).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from training import distributed
from training.cli import RunOptions, prepare_output


def import_tensorflow():
    """(tensorflow, keras), with TensorFlow's C++ info chatter off unless asked for."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    return tf, keras


@dataclass(frozen=True)
class Session:
    """What :func:`start_session` set up: the strategy to build the model under, and when."""

    strategy: object
    started: float
    cluster: object = None  # training.distributed.Cluster when TF_CONFIG names workers

    @property
    def num_workers(self) -> int:
        return self.cluster.num_workers if self.cluster is not None else 1

    def devices_per_worker(self) -> list[str]:
        """The devices each worker trains on (every worker has the same kind)."""
        try:
            return [str(device) for device in self.strategy.extended.worker_devices]
        except (RuntimeError, AttributeError, NotImplementedError):
            return ["/job:localhost/replica:0/task:0/device:CPU:0"]

    def describe_strategy(self) -> str:
        replicas = self.strategy.num_replicas_in_sync
        if self.cluster is not None:  # its class is CollectiveAllReduceStrategy
            return f"MultiWorkerMirroredStrategy ({self.cluster.num_workers} worker(s), {replicas} replica(s))"
        return f"{type(self.strategy).__name__.lstrip('_')} ({replicas} replica(s))"


def start_session(options: RunOptions) -> Session:
    """A fresh Keras session: seeds Python, NumPy and TF from ``--seed`` (``--deterministic``:
    TensorFlow op determinism on), sets the
    ``--mixed-precision`` policy, and picks a ``MirroredStrategy`` when more than one GPU
    is visible (the default strategy otherwise); a ``MultiWorkerMirroredStrategy`` when
    ``TF_CONFIG`` names workers (:mod:`training.distributed`).  ``--output`` is (re)checked first."""
    prepare_output(options.output)
    started = time.perf_counter()  # metrics.json's wall_time_seconds counts from here (TF's import included)
    cluster = distributed.cluster_from_environment()
    tf, keras = import_tensorflow()
    # Before any other TF op: MultiWorkerMirroredStrategy configures the runtime's collectives.
    strategy = distributed.make_strategy(cluster) if cluster is not None else None
    keras.backend.clear_session()
    keras.utils.set_random_seed(options.seed)
    if options.deterministic:
        # Every op picks a deterministic kernel (or raises): with the seed and the step
        # checkpoint, the same weights whether the run was interrupted or not.
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy("mixed_float16" if options.mixed_precision else "float32")
    if strategy is not None:
        return Session(strategy, started, cluster)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return Session(tf.distribute.MirroredStrategy(), started)
    return Session(tf.distribute.get_strategy(), started)


def make_optimizer(name: str, learning_rate: float):
    """``--optimizer`` / ``--learning-rate`` as a Keras optimizer."""
    import keras

    classes = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    return classes[name](learning_rate=learning_rate)


def describe_devices() -> list[str]:
    """Every device TensorFlow sees, GPUs with their names (for metrics.json)."""
    tf, _ = import_tensorflow()
    described = []
    for device in tf.config.list_physical_devices():
        details = {}
        if device.device_type == "GPU":
            try:
                details = tf.config.experimental.get_device_details(device)
            except (ValueError, RuntimeError):
                details = {}
        name = details.get("device_name")
        described.append(f"{device.name} ({name})" if name else device.name)
    return described
