"""Every command's --help in one style (issue 10, item 4), checked by walking the whole command tree,
so a command added later is checked too."""

from __future__ import annotations

import re

import pytest
import typer

from gpuflow.cli import app
from gpuflow.cli._help import plain_command
from tests.cli.conftest import cli


def _command_paths() -> list[tuple[str, ...]]:
    root = plain_command(typer.main.get_command(app))
    paths: list[tuple[str, ...]] = [()]

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                paths.append((*path, name))
                walk(sub, (*path, name))

    walk(root, ())
    return paths


PATHS = _command_paths()


def _parameter_rows(text: str) -> list[str]:
    """The first line of each row of the Arguments and Options sections."""
    rows = []
    for section in re.split(r"\n\n", text):
        head, _, body = section.partition("\n")
        if head in ("Arguments:", "Options:"):
            rows += [line for line in body.splitlines() if re.match(r"^  \S", line)]
    return rows


def test_every_command_is_walked():
    names = {path[-1] for path in PATHS if path}
    assert {"up", "status", "ls", "down", "reap", "demo", "run", "logs", "pull", "runs", "stop", "ssh", "ssh-config",
            "sync"} <= names


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "gpuflow")
def test_help_is_in_one_style(path, capsys):
    assert cli([*path, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Usage: gpuflow")
    assert not re.search(r"<[^>\n]*>", text), text  # no `<str>`, `<list[str]>`, `<int range>` type tags
    assert not re.search(r"\{[^}\n]*\}", text), text  # no `{RUN}`, `{name}`
    usage = text.splitlines()[0]
    assert not re.search(r"\[[a-z_]+\]", usage), usage  # no lower-case `[name]`
    for line in _parameter_rows(text):
        first_column = line.strip().split("  ")[0]
        for token in re.split(r"[ ,/]+", first_column):
            if token and not token.startswith("-"):  # a metavar: UPPERCASE, optional ones in brackets
                assert re.fullmatch(r"\[?[A-Z][A-Z_]*\]?(\.\.\.)?", token), line
    description = text.split("\n\n")[1].strip()
    assert description.endswith("."), description  # whole sentences


def test_top_level_summaries_are_whole_sentences_and_the_demo_comes_first(capsys):
    assert cli(["--help"]) == 0
    text = capsys.readouterr().out
    intro = text.split("Options:")[0]
    assert "gpuflow demo" in intro
    commands = text.split("Commands:")[1].strip().splitlines()
    assert commands[0].split()[0] == "demo"
    for line in commands:
        summary = line.split(None, 1)[1]
        assert not summary.endswith("..."), line  # not cut mid-sentence
        assert summary.endswith("."), line
