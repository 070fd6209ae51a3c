"""gpuflow CLI: `gpuflow init` (thin: the work is in gpuflow.project_init)."""

from __future__ import annotations

from pathlib import Path

import typer

from gpuflow.cli._app import app
from gpuflow.cli._confirm import stdin_is_terminal


@app.command("init")
def init_command(
    directory: Path = typer.Argument(Path("."), metavar="[DIR]", help="The project directory (default: here)."),
    entry: str = typer.Option(
        None, "--entry", metavar="CMD",
        help="The training entry point: a script (train.py), a module (pkg.train) or a command line. "
        "Default: train.py, main.py or a training/ package's module, else asked.",
    ),
) -> None:
    """Set a project up for gpuflow and its CI smoke test.

    Writes gpuflow.toml (every setting, commented, and the entry point),
    .gpuflowignore, tests/test_gpuflow_smoke.py (runs the entry point in the
    sandbox cloud with GPUFLOW_SMOKE=1 through the gpuflow_sandbox pytest
    fixture) and .github/workflows/gpuflow.yml. A file that exists is kept as it is.
    """
    from gpuflow.project_init import init_project

    def ask(question: str) -> str:
        return str(typer.prompt(question, err=True))

    report = init_project(directory, entry=entry, ask=ask if stdin_is_terminal() else None)
    for line in report.lines():
        typer.echo(line)
