"""gpuflow CLI: `gpuflow demo` (thin: the work is in gpuflow.jobs.demo)."""

from __future__ import annotations

import sys

import typer

from gpuflow.cli._app import app
from gpuflow.cli._signals import ended_by_signals


@app.command("demo")
def demo_command(
    epochs: int = typer.Option(15, "--epochs", min=1, metavar="N", help="Training epochs on the digits data."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream the training log."),
) -> None:
    """Run the whole workflow offline in the sandbox cloud.

    up, run training.cifar10_cnn on the digits data (with --visualize), pull and
    down, then a summary (accuracy, time, checkpoint, curves, two of the
    pictures). No AWS account is needed.
    """
    import io

    from gpuflow.jobs.demo import run_demo

    def say(message: str) -> None:
        typer.echo(f"gpuflow: {message}", err=True)

    with ended_by_signals():  # SIGTERM, too, stops the job and tears the sandbox down
        summary = run_demo(out=io.BytesIO() if quiet else sys.stdout.buffer, say=say, epochs=epochs)
    typer.echo("")
    for line in summary.lines():
        typer.echo(line)
