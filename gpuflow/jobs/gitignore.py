"""Pulled runs in a git repository: whether git ignores them, saying so once per project, and adding ``/runs/`` to .gitignore when asked."""

from __future__ import annotations

import datetime
import enum
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gpuflow.config import gpuflow_home
from gpuflow.errors import DamagedRecord
from gpuflow.state import StateStore, atomic_write_bytes

HINTS_COLLECTION = "gitignore-hints"
GITIGNORE_NAME = ".gitignore"
# The line added: the project's top-level runs/ only (a `runs/` package deeper down stays tracked).
RUNS_PATTERN = "/runs/"


class GitignoreAnswer(str, enum.Enum):
    """What became of the one time gpuflow said that a project's runs/ is not ignored."""

    HINTED = "hinted"  # said without a terminal: nobody to ask
    ADDED = "added"  # asked; the answer was yes
    DECLINED = "declined"  # asked; the answer was no


@dataclass(frozen=True)
class UnignoredRuns:
    """A project whose pulled runs git would show as untracked files."""

    project_dir: Path
    runs_dir: Path  # the pull destination's top: <project>/runs

    @property
    def gitignore(self) -> Path:
        return self.project_dir / GITIGNORE_NAME

    def line(self) -> str:
        return f"{self.runs_dir} is not ignored by git: pulled runs show up as untracked files"


def _git(directory: Path, *argv: str) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(["git", "-C", str(directory), *argv], capture_output=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git here: nothing to say
        return None


def _is_ignored(directory: Path, path: Path) -> bool | None:
    """Whether git ignores ``path`` (None: ``directory`` is in no git work tree, or git cannot tell)."""
    inside = _git(directory, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.returncode != 0 or inside.stdout.strip() != b"true":
        return None
    checked = _git(directory, "check-ignore", "-q", "--", str(path))
    if checked is None or checked.returncode not in (0, 1):
        return None
    return checked.returncode == 0


def _store() -> StateStore:
    return StateStore(gpuflow_home(), HINTS_COLLECTION)


def _key(project_dir: Path) -> str:
    return "project-" + hashlib.sha256(str(project_dir.resolve()).encode()).hexdigest()[:24]


def unignored_runs(project_dir: Path) -> UnignoredRuns | None:
    """The project, when git does not ignore the runs pulled into its ``runs/`` (the newest
    run directory there is what git is asked about) and this was not said for it before;
    None when git ignores them, the project is in no git work tree, nothing was pulled, or
    it was said already (remembered per project under the gpuflow home)."""
    project = project_dir.resolve()
    runs_dir = project / "runs"
    if runs_dir.is_symlink() or not runs_dir.is_dir():
        return None
    try:
        if _store().get(_key(project)) is not None:
            return None
    except DamagedRecord:
        return None  # a remembered answer, if unreadable: do not nag
    pulled = [path for path in runs_dir.iterdir() if path.is_dir() and not path.is_symlink()]
    newest = max(pulled, key=lambda path: path.stat().st_mtime_ns, default=runs_dir)
    if _is_ignored(project, newest) is not False:
        return None
    return UnignoredRuns(project_dir=project, runs_dir=runs_dir)


def remember_gitignore_answer(found: UnignoredRuns, answer: GitignoreAnswer) -> None:
    """Never say it again for this project."""
    store = _store()
    moment = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with store.locked():
        store.put(_key(found.project_dir), {"project": str(found.project_dir), "answer": answer.value, "at": moment})


def add_runs_to_gitignore(found: UnignoredRuns) -> Path:
    """Append ``/runs/`` to the project's .gitignore (created when missing; left alone when it
    has that line already), in one atomic step that keeps its content and mode; returns the
    file written."""
    path = found.gitignore
    target = path.resolve() if path.is_symlink() else path  # a linked .gitignore stays a link
    with _store().locked():  # two gpuflows answering at once add one line
        try:
            existing = target.read_bytes()
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            existing, mode = b"", 0o644
        if RUNS_PATTERN.encode() in (line.strip() for line in existing.splitlines()):
            return target
        separator = b"\n" if existing and not existing.endswith(b"\n") else b""
        atomic_write_bytes(target, existing + separator + RUNS_PATTERN.encode() + b"\n", mode=mode)
    return target


__all__ = [
    "RUNS_PATTERN", "GitignoreAnswer", "UnignoredRuns", "add_runs_to_gitignore", "remember_gitignore_answer",
    "unignored_runs",
]
