"""The one way a destructive command asks: what will be deleted, then the question; without a terminal, --yes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from gpuflow.errors import UsageError


def stdin_is_terminal() -> bool:
    """Whether a person can answer (tests replace this to stand for a terminal)."""
    return sys.stdin is not None and sys.stdin.isatty()


def ask(question: str) -> bool:
    """The question on stderr, the answer from stdin: "y"/"yes" is yes; anything else, or end of
    input, is no (tests replace this to answer).  Not typer.confirm: its prompt puts a space on stdout."""
    typer.echo(f"{question} [y/N]: ", err=True, nl=False)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def confirm_deletion(what: Sequence[str], *, yes: bool, command: str, again: str) -> bool:
    """Whether to go ahead with deleting ``what`` (one line per thing).

    ``--yes``: go ahead.  Without a terminal: a one-line error saying to add
    --yes (``command`` is the gpuflow command, e.g. ``down``; ``again`` the
    command line to run instead, with --yes).  On a terminal: say what
    will be deleted, then ask; "n" prints "nothing deleted" and returns False,
    and the command then ends with exit code 0.
    """
    if yes:
        return True
    if not stdin_is_terminal():
        raise UsageError(
            f"`gpuflow {command}` needs --yes when not run from a terminal (it deletes {'; '.join(what)}); "
            "nothing deleted",
            hint=f"run {again}",
        )
    typer.echo("gpuflow: this deletes:", err=True)
    for line in what:
        typer.echo(f"  {line}", err=True)
    if ask("Delete?"):
        return True
    typer.echo("nothing deleted")
    return False
