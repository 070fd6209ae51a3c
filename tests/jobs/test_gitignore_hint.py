"""Pulled runs/ in a git repository: when git does not ignore them, gpuflow says so once per
project and, on a terminal, offers to add `/runs/` to .gitignore — never editing it unasked
(issue 10, item 17).  Real `git init` repositories, runs through the CLI in the sandbox."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from gpuflow.cli import _confirm
from infra.sandbox import in_process_sandbox
from tests.jobs.after_support import cli, make_project, only_record, sandbox_cluster

pytestmark = pytest.mark.slow

HINT = "is not ignored by git"


def _git(directory: Path, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *argv], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repository(tmp_path, monkeypatch) -> Path:
    directory = make_project(tmp_path / "repository")
    _git(directory, "init", "-q")
    monkeypatch.chdir(directory)
    return directory


def _terminal(monkeypatch, answer: str | None) -> None:
    """A person at a terminal who answers ``answer`` (None: no terminal at all)."""
    monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: answer is not None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("" if answer is None else answer + "\n"))


def _untracked(directory: Path) -> list[str]:
    return _git(directory, "status", "--porcelain", "--untracked-files=all").splitlines()


def test_without_a_terminal_the_hint_is_one_line_once_per_project_and_nothing_is_edited(
    repository, tmp_path, monkeypatch, capfd
):
    _terminal(monkeypatch, None)
    (repository / ".gitignore").write_text("*.pyc")
    other = make_project(tmp_path / "other")
    _git(other, "init", "-q")
    plain = make_project(tmp_path / "plain")  # in no git repository
    with in_process_sandbox(), sandbox_cluster(repository, "gitbox"):
        assert cli(["run", "gitbox", "--", "python", "job.py", "1"]) == 0
        hints = [line for line in capfd.readouterr().err.splitlines() if HINT in line]
        assert hints == [
            f"gpuflow: {repository / 'runs'} is not ignored by git: pulled runs show up as untracked files "
            f"(add /runs/ to {repository / '.gitignore'}; said once)"
        ]
        assert (repository / ".gitignore").read_text() == "*.pyc"
        assert any(line.startswith("?? runs/") for line in _untracked(repository))
        assert cli(["pull", only_record().run_id]) == 0  # not repeated for this project...
        assert HINT not in capfd.readouterr().err

        assert cli(["run", "gitbox", "--project-dir", str(other), "--", "python", "job.py", "1"]) == 0
        assert [line for line in capfd.readouterr().err.splitlines() if HINT in line] == [  # ...but for another
            f"gpuflow: {other / 'runs'} is not ignored by git: pulled runs show up as untracked files "
            f"(add /runs/ to {other / '.gitignore'}; said once)"
        ]
        assert cli(["run", "gitbox", "--project-dir", str(plain), "--", "python", "job.py", "1"]) == 0
        assert HINT not in capfd.readouterr().err
    assert not (other / ".gitignore").exists() and not (plain / ".gitignore").exists()


def test_on_a_terminal_yes_appends_runs_to_gitignore(repository, monkeypatch, capfd):
    _terminal(monkeypatch, "y")
    (repository / ".gitignore").write_text("*.pyc\nbuild/")  # no newline at its end
    with in_process_sandbox():
        assert cli(["run", "--up", "--sandbox", "--down", "gitbox", "--", "python", "job.py", "1", "3"]) == 3
    err = capfd.readouterr().err  # a failed job's files were pulled too: asked all the same
    assert f"gpuflow: {repository / 'runs'} is not ignored by git: pulled runs show up as untracked files" in err
    assert f"Add /runs/ to {repository / '.gitignore'}? [y/N]: " in err
    assert (repository / ".gitignore").read_text() == "*.pyc\nbuild/\n/runs/\n"
    assert sorted(path.name for path in repository.iterdir()) == [".git", ".gitignore", "job.py", "runs"]
    assert (Path(only_record().local_dir) / "job.log").is_file()
    assert _untracked(repository) == ["?? .gitignore", "?? job.py"]  # runs/ no longer shows


def test_on_a_terminal_no_leaves_gitignore_alone_and_is_not_asked_again(repository, tmp_path, monkeypatch, capfd):
    _terminal(monkeypatch, "n")
    excluded = make_project(tmp_path / "excluded")
    _git(excluded, "init", "-q")
    (excluded / ".git" / "info").mkdir(exist_ok=True)
    (excluded / ".git" / "info" / "exclude").write_text("runs\n")  # ignored, though not by .gitignore
    with in_process_sandbox(), sandbox_cluster(repository, "gitbox"):
        assert cli(["run", "gitbox", "--", "python", "job.py", "1"]) == 0
        assert f"Add /runs/ to {repository / '.gitignore'}? [y/N]: " in capfd.readouterr().err
        _terminal(monkeypatch, "y")
        assert cli(["pull", only_record().run_id]) == 0
        err = capfd.readouterr().err
        assert HINT not in err and "Add /runs/" not in err
        assert cli(["run", "gitbox", "--project-dir", str(excluded), "--", "python", "job.py", "1"]) == 0
        err = capfd.readouterr().err
        assert HINT not in err and "Add /runs/" not in err
    assert not (repository / ".gitignore").exists() and not (excluded / ".gitignore").exists()
