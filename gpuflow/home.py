"""Where gpuflow keeps its files (``$GPUFLOW_HOME``, else ``~/.gpuflow``), with ``os`` alone.

The one rule, shared by :func:`gpuflow.config.gpuflow_home` (which also
creates the directory) and the `gpuflow ssh` fast path (:mod:`gpuflow.ssh_fast`,
which must not import the configuration reader).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_HOME = "GPUFLOW_HOME"


def home_path(environ: Mapping[str, str] | None = None) -> str:
    """``$GPUFLOW_HOME`` (``~`` expanded) if set, else ``~/.gpuflow``; not created here."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_HOME)
    return os.path.expanduser(raw) if raw else os.path.join(os.path.expanduser("~"), ".gpuflow")
