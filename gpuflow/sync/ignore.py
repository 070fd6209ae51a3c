"""Which files of a directory gpuflow sends: ignore rules and the one file list.

``scan_tree`` is the single place that decides what a sync considers; the rsync
transport, the tar transport, the local copy and the large-tree warning all
use its result, so they can never disagree about what "the project" is.

Rules, in git's own semantics (matched by :mod:`gpuflow.sync.wildmatch`, in time
linear in pattern times path, as git's wildmatch: no pattern can hang a sync):

* every ``.gitignore`` in the tree applies to the paths below its directory;
  a deeper file overrides a shallower one, ``!pattern`` re-includes, and a
  path under an ignored directory stays ignored;
* a ``.gpuflowignore`` beside it is read after the ``.gitignore`` of the same
  directory, so it can add exclusions (``data/``) or re-include a file git
  ignores (``!weights.h5``);
* always skipped: ``.git``, ``__pycache__`` and ``.venv`` at any depth, and the
  names in ``skip_top_level`` at the root (``runs`` for a project: that is
  where ``gpuflow pull`` puts results).

Symbolic links are never followed.  A relative link that stays inside the tree
is kept as a link (the target side gets the same link); an absolute link, or
one that leads out of the tree, is skipped and reported in
``SourceTree.skipped_links``: sending it would either leak a file from outside
the project or create a link pointing anywhere on the instance.
"""

from __future__ import annotations

import os
import stat
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from gpuflow.config import read_user_text
from gpuflow.errors import ConfigError
from gpuflow.sync.wildmatch import IgnorePattern, IgnoreSpec, compile_ignore_line

ALWAYS_SKIPPED = frozenset({".git", "__pycache__", ".venv"})
IGNORE_FILE_NAMES = (".gitignore", ".gpuflowignore")
PROJECT_SKIPPED_TOP_LEVEL = frozenset({"runs"})


class LocalEntry(NamedTuple):
    """One file or symbolic link to send, with what the change check compares.

    A named tuple, not a dataclass: a sync holds one per file of the tree
    (50,000 for a big one), and a tuple is built several times faster and takes
    a third of the memory of a frozen dataclass instance."""

    path: str  # relative to the tree's root, '/'-separated
    kind: str  # "file" or "link"
    size: int
    mtime_ns: int
    mode: int  # permission bits (st_mode & 0o7777); 0 for links
    link_target: str | None = None


class IgnoreRules:
    """The ignore decisions for one tree: ``.gitignore``/``.gpuflowignore``
    files per directory plus the fixed skips.

    Kept as an object (not a module global) because the sync also asks it
    about paths that exist only on the destination: a destination file that
    the rules ignore (``__pycache__``, an ignored ``checkpoints/``) is left
    alone instead of being deleted, as ``rsync --delete`` leaves excluded
    files alone.
    """

    def __init__(self, skip_top_level: Iterable[str] = ()) -> None:
        self._skip_top_level = frozenset(skip_top_level)
        self._specs: dict[str, IgnoreSpec] = {}
        self._directory_cache: dict[str, bool] = {}

    def load_directory(self, root: Path, relative_directory: str) -> None:
        """Read the ignore files of one directory (``''`` is the root).  A file
        that is not UTF-8, or a line that is not a valid pattern, is a
        :class:`ConfigError` naming the file and the line."""
        patterns: list[IgnorePattern] = []
        directory = root / relative_directory if relative_directory else root
        for name in IGNORE_FILE_NAMES:
            path = directory / name
            try:
                text = read_user_text(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            for number, line_text in enumerate(text.splitlines(), start=1):
                pattern = compile_ignore_line(line_text)
                if pattern is not None and pattern.error:
                    shown = f"'{line_text}'" if line_text.isprintable() else repr(line_text)
                    raise ConfigError(f"{path}:{number}: invalid pattern {shown}: {pattern.error}")
                if pattern is not None:
                    patterns.append(pattern)
        if patterns:
            self._specs[relative_directory] = IgnoreSpec([], patterns=tuple(patterns))
            self._directory_cache.clear()

    def _decide(self, parts: list[str], is_directory: bool) -> bool:
        """The deepest ignore file with a matching pattern decides (git's order)."""
        for depth in range(len(parts) - 1, -1, -1):
            spec = self._specs.get("/".join(parts[:depth]))
            if spec is None:
                continue
            decision = spec.decide("/".join(parts[depth:]), is_directory)
            if decision is not None:
                return decision
        return False

    def _fixed_skip(self, parts: list[str]) -> bool:
        return parts[0] in self._skip_top_level or any(part in ALWAYS_SKIPPED for part in parts)

    def directory_ignored(self, relative_path: str) -> bool:
        """Whether a directory is ignored, itself or through an ignored parent."""
        cached = self._directory_cache.get(relative_path)
        if cached is not None:
            return cached
        parts = relative_path.split("/")
        ignored = (
            self._fixed_skip(parts)
            or (len(parts) > 1 and self.directory_ignored("/".join(parts[:-1])))
            or self._decide(parts, is_directory=True)
        )
        self._directory_cache[relative_path] = ignored
        return ignored

    def file_ignored_in_kept_directory(self, relative_directory: str, name: str, relative_path: str) -> bool:
        """``ignored(relative_path)`` for a file of a directory already known not
        to be ignored (the scan's case): its parents need no second look."""
        if name in ALWAYS_SKIPPED or (not relative_directory and name in self._skip_top_level):
            return True
        return bool(self._specs) and self._decide(relative_path.split("/"), is_directory=False)

    def ignored(self, relative_path: str, *, is_directory: bool = False) -> bool:
        """Whether ``relative_path`` ('/'-separated, relative to the root) is ignored."""
        if is_directory:
            return self.directory_ignored(relative_path)
        parts = relative_path.split("/")
        if self._fixed_skip(parts):
            return True
        if len(parts) > 1 and self.directory_ignored("/".join(parts[:-1])):
            return True
        return self._decide(parts, is_directory=False)


@dataclass(frozen=True)
class SourceTree:
    """The result of one scan: what a sync considers, and why the rest is not."""

    root: Path
    entries: tuple[LocalEntry, ...]
    directories: frozenset[str]  # every directory kept (not ignored), empty or not: it exists on the destination too
    skipped_links: tuple[str, ...]
    rules: IgnoreRules

    @cached_property
    def index(self) -> dict[str, int]:
        """path -> its position in ``entries`` (built once, on first use)."""
        return {entry.path: position for position, entry in enumerate(self.entries)}

    def position(self, path: str) -> int | None:
        """``path``'s position in ``entries``, or None: through :attr:`index` once
        built, else by bisection (a few lookups need no index of every file)."""
        if "index" in self.__dict__:
            return self.index.get(path)
        at = bisect_left(self.entries, path, key=itemgetter(0))
        return at if at < len(self.entries) and self.entries[at].path == path else None

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)

    def paths(self) -> list[str]:
        return [entry.path for entry in self.entries]


def _link_stays_inside(root_real: str, link_path: str, relative_path: str, target: str) -> bool:
    """A link may be sent only if it is relative and resolves inside the tree
    (lexically, and on disk when its target exists)."""
    if os.path.isabs(target):
        return False
    lexical = os.path.normpath(os.path.join(os.path.dirname(relative_path), target))
    if lexical == ".." or lexical.startswith("../") or os.path.isabs(lexical):
        return False
    resolved = os.path.realpath(link_path)
    if os.path.lexists(resolved) or os.path.exists(link_path):
        return resolved == root_real or resolved.startswith(root_real + os.sep)
    return True


def scan_tree(root: Path, *, skip_top_level: Iterable[str] = ()) -> SourceTree:
    """Walk ``root`` (without following links) and return the files to sync.

    Ignored directories are pruned, never descended into, so an ignored
    ``data/`` of a million files costs one ``stat``.
    """
    root = Path(root)
    root_real = os.path.realpath(root)
    rules = IgnoreRules(skip_top_level)
    entries: list[LocalEntry] = []
    directories: set[str] = set()
    skipped_links: list[str] = []
    shared_modes: dict[int, int] = {}
    pending = [""]
    while pending:
        relative_directory = pending.pop()
        rules.load_directory(root, relative_directory)
        absolute_directory = os.path.join(root, relative_directory) if relative_directory else str(root)
        try:
            with os.scandir(absolute_directory) as iterator:
                items = list(iterator)  # in the directory's order: the entries are sorted once, at the end
        except OSError:
            continue
        prefix = f"{relative_directory}/" if relative_directory else ""
        for item in items:
            name = item.name
            relative_path = prefix + name
            try:
                # The directory entry's type (d_type) needs no system call; the one
                # lstat is for the files and links kept (their size and mtime).
                if item.is_dir(follow_symlinks=False):
                    if not rules.directory_ignored(relative_path):
                        pending.append(relative_path)
                        directories.add(relative_path)
                    continue
                if rules.file_ignored_in_kept_directory(relative_directory, name, relative_path):
                    continue
                status = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we walked
            mode = status.st_mode
            if stat.S_ISDIR(mode):
                continue  # replaced by a directory while we walked
            if stat.S_ISREG(mode):
                permissions = mode & 0o7777
                permissions = shared_modes.setdefault(permissions, permissions)  # one int object per distinct mode
                entries.append(LocalEntry(relative_path, "file", status.st_size, status.st_mtime_ns, permissions))
            elif stat.S_ISLNK(mode):
                absolute_path = item.path
                target = os.readlink(absolute_path)
                if not _link_stays_inside(root_real, absolute_path, relative_path, target):
                    skipped_links.append(relative_path)
                    continue
                entries.append(LocalEntry(relative_path, "link", 0, status.st_mtime_ns, 0, target))
            else:
                continue  # sockets, fifos, devices: not project content
    entries.sort(key=itemgetter(0))  # by path
    skipped_links.sort()
    return SourceTree(root, tuple(entries), frozenset(directories), tuple(skipped_links), rules)
