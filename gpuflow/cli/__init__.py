"""The gpuflow command line: thin typer commands, one module per group.

The application is :data:`gpuflow.cli._app.app`; importing this package adds
every group's commands to it (the demo first: it is listed first in
``gpuflow --help``).  The command modules import only typer (and rich when
they print) and gpuflow's core at module level; the use cases
(:mod:`gpuflow.clusters`, :mod:`gpuflow.jobs`, :mod:`gpuflow.sync`,
:mod:`gpuflow.nodes`, :mod:`gpuflow.ssh_config`), and through them boto3,
paramiko and TensorFlow, are imported inside the commands that use them, so
``gpuflow --help`` starts fast.

:func:`main` is the one place where domain errors become a one-line message
and an exit code (``GPUFLOW_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import sys

from gpuflow.cli import demo  # noqa: F401, I001 - registers its command, listed first
from gpuflow.cli import cluster, init, jobs, remote, sandbox, setup, sync, tunnels  # noqa: F401 - register their commands
from gpuflow.cli import _coercion
from gpuflow.cli._app import app
from gpuflow.cli._errors import run_app
from gpuflow.cli._signals import terminate_like_ctrl_c


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and map domain errors to exit codes."""
    terminate_like_ctrl_c()
    _coercion.install()  # no pydantic for values whose coercion is known (gpuflow/cli/_coercion.py)
    code = run_app(app, sys.argv[1:] if argv is None else argv)
    raise SystemExit(code)


__all__ = ["app", "main", "run_app"]
