"""gpuflow CLI: `gpuflow sync [NAME] [--data PATH]` (thin: the work is in gpuflow.sync)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gpuflow.cli._app import app
from gpuflow.config import find_project_root


def _printable(path: str) -> str:
    return path if path.isprintable() else repr(path)


@app.command("sync")
def sync(
    name: Optional[str] = typer.Argument(  # noqa: UP007 - typer needs Optional on 3.10
        None, metavar="NAME", help="The cluster (default: the project's `cluster` setting, else the only cluster)."
    ),
    data: Optional[Path] = typer.Option(  # noqa: UP007
        None,
        "--data",
        metavar="PATH",
        help="Sync this data directory to BASE/data/ITS_NAME/ on the instance (where later runs find it) instead of the project.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the sync report as JSON on stdout (no progress bar)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be sent and deleted; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before sending a very large tree."),
    method: str = typer.Option(
        "auto", "--method", help="auto (rsync when both ends have it, else tar; copy for the sandbox), rsync or tar."
    ),
) -> None:
    """Push the project directory to a cluster.

    It honours .gitignore and .gpuflowignore; only changes travel.
    """
    import json
    import sys

    from gpuflow.sync import sync_cluster

    interactive = sys.stdin.isatty() and sys.stderr.isatty() and not as_json
    if yes:
        confirm = lambda message: True  # noqa: E731
    elif interactive:
        confirm = lambda message: typer.confirm(f"gpuflow: warning: {message}. Send anyway?", err=True)  # noqa: E731
    else:
        confirm = None  # not interactive: warn on stderr and go on
    report = sync_cluster(
        name,
        data_dir=data,
        dry_run=dry_run,
        method=method,
        progress=sys.stderr.isatty() and not as_json,
        confirm_large=confirm,
        project_dir=find_project_root(),
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo(report.summary())
    if dry_run:
        for path in report.sent:
            typer.echo(f"  send    {_printable(path)}")
        for path in report.deleted:
            typer.echo(f"  delete  {_printable(path)}")
        for path in report.created:
            typer.echo(f"  mkdir   {_printable(path + '/')}")
