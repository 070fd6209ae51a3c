"""The typer application every command module adds its commands to (``gpuflow``, ``--version``, ``--help``).

Its own module so that the command modules import it from here, and
:mod:`gpuflow.cli` imports them: the imports go one way.
"""

from __future__ import annotations

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
