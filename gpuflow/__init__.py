"""gpuflow: train Keras models on cloud GPUs from a laptop.

The package is layered: ``gpuflow.cli`` (thin typer commands) calls use-case
functions, which talk to a provisioner (``infra``, the only place that imports
boto3), a command runner (``gpuflow.transport``, the only place that imports
paramiko) and a syncer.  Nothing heavy is imported at package import
time, so ``gpuflow --help`` stays fast.
"""

__version__ = "0.1.0"
