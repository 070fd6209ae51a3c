"""What a sync is: destinations, the destination's listing, the plan (what to send and delete) and the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

from gpuflow.errors import SecurityError
from gpuflow.records import SSHTarget
from gpuflow.sync.ignore import LocalEntry, SourceTree


@dataclass(frozen=True)
class LocalDestination:
    """A directory on this machine (the sandbox's LocalRunner base_dir, tests)."""

    directory: Path

    def describe(self) -> str:
        return str(self.directory)


@dataclass(frozen=True)
class SSHDestination:
    """A directory on an SSH target; a relative ``directory`` is relative to
    the login user's home (``gpuflow/project``)."""

    target: SSHTarget
    directory: str

    def describe(self) -> str:
        return f"{self.target.user}@{self.target.host}:{self.directory}"


Destination = Union[LocalDestination, SSHDestination]


@dataclass(frozen=True)
class SyncReport:
    """What one sync did (or, with ``dry_run``, would do)."""

    source: str
    destination: str
    method: str  # "delta" | "rsync" | "tar" | "copy"
    files_considered: int
    bytes_considered: int
    files_sent: int
    bytes_sent: int  # file bytes sent (rsync may put fewer on the wire thanks to its delta transfer)
    files_deleted: int
    seconds: float
    dry_run: bool = False
    sent: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    skipped_links: tuple[str, ...] = ()
    directories_created: int = 0  # empty directories of the tree the destination lacked
    created: tuple[str, ...] = ()
    compressed: bool = False  # the tar stream travelled gzip-compressed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("sent", "deleted", "skipped_links", "created"):
            data[key] = list(data[key])
        return data

    def summary(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        text = (
            f"{verb} {self.files_sent:,} of {self.files_considered:,} files "
            f"({human_bytes(self.bytes_sent)} of {human_bytes(self.bytes_considered)}) "
            f"to {self.destination} via {self.method}{' (gzip)' if self.compressed else ''} in {self.seconds:.2f} s"
        )
        if self.files_deleted:
            text += f"; {'would delete' if self.dry_run else 'deleted'} {self.files_deleted:,}"
        if self.directories_created:
            count = self.directories_created
            text += (
                f"; {'would create' if self.dry_run else 'created'} {count:,} "
                f"empty {'directory' if count == 1 else 'directories'}"
            )
        return text


class DestinationEntry(NamedTuple):
    """One entry of the destination listing (a named tuple: one per file of the destination)."""

    kind: str  # "file" | "link" | "dir" | "other"
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    link_target: str | None = None


@dataclass(frozen=True)
class DestinationState:
    """The destination's side of the plan."""

    exists: bool
    entries: dict[str, DestinationEntry] = field(default_factory=dict)
    listed: bool = True  # False when the listing failed: send everything, delete nothing
    has_rsync: bool = False
    has_gzip: bool = False  # the destination can unpack a gzip-compressed tar stream
    # When the listing was read against the scanned tree (streamed: see ListingParser): one byte per
    # tree entry, 1 where the destination holds that entry as it is; such entries are left out of
    # ``entries`` (the plan needs only what differs), so a no-change sync keeps nothing per file.
    unchanged: bytes | None = None


@dataclass(frozen=True)
class SyncPlan:
    to_send: tuple[LocalEntry, ...]
    to_delete: tuple[str, ...]  # files and links, then directories deepest first
    # Directories of the tree the destination lacks and no sent entry creates
    # (empty ones, or holding only ignored files), parents first; made after the deletions.
    to_create: tuple[str, ...] = ()

    @property
    def bytes_to_send(self) -> int:
        return sum(entry.size for entry in self.to_send)


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


# --------------------------------------------------------------------------- planning


def same_mtime(local_ns: int, remote_ns: int) -> bool:
    """Equal, or equal to the second when the destination keeps only seconds."""
    if local_ns == remote_ns:
        return True
    return remote_ns % 1_000_000_000 == 0 and local_ns // 1_000_000_000 == remote_ns // 1_000_000_000


def needs_sending(local: LocalEntry, remote: DestinationEntry | None) -> bool:
    if remote is None or remote.kind != local.kind:
        return True
    if local.kind == "link":
        return remote.link_target != local.link_target
    return remote.size != local.size or remote.mode != local.mode or not same_mtime(local.mtime_ns, remote.mtime_ns)


def _safe_relative(path: str) -> bool:
    return bool(path) and not path.startswith("/") and ".." not in path.split("/") and "\0" not in path


def plan_sync(tree: SourceTree, state: DestinationState) -> SyncPlan:
    """What to send and what to delete so the destination mirrors the tree."""
    unchanged = state.unchanged
    if unchanged is None:
        to_send = tuple(entry for entry in tree.entries if needs_sending(entry, state.entries.get(entry.path)))
    else:
        if len(unchanged) != len(tree.entries):
            raise ValueError("the destination listing was read against another tree")
        get = state.entries.get
        to_send = tuple(
            entry for entry, same in zip(tree.entries, unchanged) if not same and needs_sending(entry, get(entry.path))
        )
    if not state.listed:
        return SyncPlan(tree.entries, (), _directories_to_create(tree, state, tree.entries))
    doomed_files: list[str] = []
    doomed_directories: list[str] = []
    # A few listed entries (the directories of a no-change sync) are looked up by bisection.
    local_paths = tree.index if len(state.entries) > 64 else _Held(tree)
    for path, entry in state.entries.items():
        if not _safe_relative(path):
            raise SecurityError(f"the destination listing holds an unsafe path {path!r}; sync refused")
        if entry.kind == "dir":
            if path in local_paths:
                doomed_directories.append(path)  # the tree now has a file or link here
            elif path not in tree.directories and not tree.rules.ignored(path, is_directory=True):
                doomed_directories.append(path)
        elif path in tree.directories:
            doomed_files.append(path)  # the tree now has a directory here
        elif path not in local_paths and not tree.rules.ignored(path):
            doomed_files.append(path)
    doomed_directories.sort(key=lambda path: (-path.count("/"), path))
    to_create = _directories_to_create(tree, state, to_send)
    return SyncPlan(to_send, tuple(sorted(doomed_files)) + tuple(doomed_directories), to_create)


class _Held:
    """``path in _Held(tree)``: whether the tree holds a file or link at ``path``."""

    def __init__(self, tree: SourceTree) -> None:
        self._tree = tree

    def __contains__(self, path: str) -> bool:
        return self._tree.position(path) is not None


def _directories_to_create(tree: SourceTree, state: DestinationState, to_send: tuple[LocalEntry, ...]) -> tuple[str, ...]:
    """The tree's directories the destination lacks (or holds a non-directory
    at, deleted first) that no sent entry's unpacking creates anyway."""
    made_by_sending: set[str] = set()
    for entry in to_send:
        parent = entry.path.rpartition("/")[0]
        while parent and parent not in made_by_sending:
            made_by_sending.add(parent)
            parent = parent.rpartition("/")[0]
    missing = (
        path
        for path in tree.directories
        if path not in made_by_sending and (path not in state.entries or state.entries[path].kind != "dir")
    )
    return tuple(sorted(missing, key=lambda path: (path.count("/"), path)))
