"""The gpuflow command line: thin typer commands, one module per group.

The application is :data:`gpuflow.cli._app.app`; :func:`load_commands` adds
the command modules' commands to it (the demo first: it is listed first in
``gpuflow --help``): :func:`main` only the module of the command it is given,
``gpuflow.cli.app`` every one.  The command modules import only typer (and rich when
they print) and gpuflow's core at module level; the use cases
(:mod:`gpuflow.clusters`, :mod:`gpuflow.jobs`, :mod:`gpuflow.sync`,
:mod:`gpuflow.nodes`, :mod:`gpuflow.ssh_config`), and through them boto3,
paramiko and TensorFlow, are imported inside the commands that use them, so
``gpuflow --help`` starts fast.

:func:`main` is the one place where domain errors become a one-line message
and an exit code (``GPUFLOW_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from gpuflow.cli import _coercion
from gpuflow.cli._app import app as _application  # `app`: every command registered (see __getattr__)
from gpuflow.cli._errors import run_app
from gpuflow.cli._signals import terminate_like_ctrl_c

# The command modules, in the order `gpuflow --help` lists their commands (the demo first).
COMMAND_MODULES = ("demo", "cluster", "init", "jobs", "remote", "sandbox", "setup", "sync", "tunnels")
# Which module registers each command (tests/cli/test_command_modules.py checks it against the
# app): a command line naming one loads that module alone, so typer builds and checks only its
# commands (`gpuflow run` neither imports nor converts the other 14); any other command line
# (help, --version, a word that is no command) loads them all.
MODULE_OF_COMMAND = {
    "demo": "demo",
    "up": "cluster", "status": "cluster", "ls": "cluster", "down": "cluster", "reap": "cluster",
    "init": "init",
    "run": "jobs", "resume": "jobs", "logs": "jobs", "pull": "jobs", "runs": "jobs", "stop": "jobs",
    "ssh": "remote", "ssh-config": "remote",
    "sandbox": "sandbox",
    "setup": "setup",
    "sync": "sync",
    "forward": "tunnels", "notebook": "tunnels", "tensorboard": "tunnels",
}


def load_commands(modules: tuple[str, ...] = COMMAND_MODULES) -> Any:
    """The typer app with the commands of ``modules`` (default: all) registered, listed in the
    order of :data:`COMMAND_MODULES` whichever were loaded before."""
    for name in modules:
        importlib.import_module(f"gpuflow.cli.{name}")
    order = {f"gpuflow.cli.{name}": index for index, name in enumerate(COMMAND_MODULES)}
    _application.registered_commands.sort(key=lambda command: order.get(command.callback.__module__, len(order)))
    return _application


def __getattr__(name: str) -> Any:
    if name == "app":  # the whole application (tests, gpuflow.testing): every command registered
        return load_commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and map domain errors to exit codes."""
    terminate_like_ctrl_c()
    _coercion.install()  # no pydantic for values whose coercion is known (gpuflow/cli/_coercion.py)
    argv = sys.argv[1:] if argv is None else argv
    module = MODULE_OF_COMMAND.get(argv[0]) if argv else None
    app = load_commands((module,) if module is not None else COMMAND_MODULES)
    code = run_app(app, argv)
    raise SystemExit(code)


__all__ = ["app", "load_commands", "main", "run_app"]
