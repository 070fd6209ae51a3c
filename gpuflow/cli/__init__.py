"""The gpuflow command line: thin typer commands, one module per group.

This module and the command modules import only typer (and rich when they
print): boto3, paramiko and TensorFlow are imported inside the
use-case functions that need them, so ``gpuflow --help`` starts fast.

:func:`main` is the one place where domain errors become a one-line message
and an exit code (``GPUFLOW_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import sys

import typer

from gpuflow import __version__

app = typer.Typer(
    name="gpuflow",
    help="Train Keras models on cloud GPUs from a laptop: up, run, down, and nothing is left billing.\n\n"
    "New here? `gpuflow demo` runs the whole workflow (up, run, pull, down) offline in the sandbox cloud, "
    "without an AWS account, in about a minute.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: typer's rich help costs ~0.25 s of imports, more than the whole 0.2 s start-up budget.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gpuflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train Keras models on cloud GPUs from a laptop."""


def _register_commands() -> None:
    # Each module adds its commands to `app`; all of them import only typer/rich at module level.
    # The demo first: it is listed first in `gpuflow --help`.
    from gpuflow.cli import demo  # noqa: F401, I001
    from gpuflow.cli import cluster, jobs, remote, sync  # noqa: F401
    from gpuflow.cli import init  # noqa: F401


def _terminate_like_ctrl_c() -> None:
    """A SIGTERM (a CI runner cancelling a job, ``kill``, a closing terminal
    multiplexer) ends gpuflow the way Ctrl-C does, so every cleanup path runs:
    ``up`` rolls back, ``run --down`` stops the job and tears the cluster down.
    A second SIGTERM ends gpuflow at once."""
    import signal

    def interrupt(signal_number: int, _frame: object) -> None:
        signal.signal(signal_number, signal.SIG_DFL)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # not when the caller chose otherwise
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and map domain errors to exit codes."""
    from gpuflow.cli._errors import run_app

    _terminate_like_ctrl_c()
    _register_commands()
    code = run_app(app, sys.argv[1:] if argv is None else argv)
    raise SystemExit(code)
