"""``gpuflow sync``: push a project (or a data directory) to an instance.

How a sync works, whatever the destination:

1. :func:`gpuflow.ignore.scan_tree` lists the local files (``.gitignore``,
   ``.gpuflowignore``, fixed skips, symlink policy) with size, mtime and mode.
2. One look at the destination lists what is already there (size, mtime,
   mode, link target; never following links).  Over SSH this is the first
   command of one OpenSSH connection (a ControlMaster the rest of the sync
   reuses); it also says whether the remote has rsync, and it stays open to
   carry the next step on the same stdin.
3. The plan: a file is sent when the destination lacks it or its size, mode or
   mtime differ (rsync's quick check); a destination file or link the local
   tree no longer has is deleted, unless the ignore rules cover it (a remote
   ``__pycache__`` or an ignored ``checkpoints/`` is left alone, as
   ``rsync --delete`` leaves excluded files alone).  Deletions only ever name
   paths from the destination's own listing, relative to the destination,
   without ``..``: nothing outside the destination directory is touched.
4. Only the files in the plan travel.  Over SSH, the deletions and an
   uncompressed tar stream of the planned files go down the listing session's
   stdin (written here by :mod:`tarfile`, pax format; ``tar -xpf -`` there):
   one connection, one remote shell for the whole sync.  rsync (``--files-from``
   the plan, NUL-separated, over the same multiplexed connection) is used when
   it can save bytes: when the plan rewrites at least ``RSYNC_DELTA_MIN_BYTES``
   of files the destination already holds an older version of, so its delta
   transfer sends only the changed blocks; ``method="rsync"`` forces it,
   ``method="tar"`` forbids it.  To a local directory: a Python copy (temp
   file + rename, mtime and mode kept).

A no-change re-sync therefore costs one SSH connection and one remote
``find``: no rsync process, no file list exchange; a first sync or an edit
costs one connection plus the bytes of the changed files.

Why the destination listing and not a local manifest of the last sync: the
listing is the truth (another laptop, or a job, may have changed the remote
tree) and, over a multiplexed connection, it is as cheap as reading a local
file would be worth; a cache could only add a way to be wrong.

SSH always runs as ``ssh -F none`` with the cluster's pinned known_hosts,
``StrictHostKeyChecking=yes`` (``accept-new`` only for a target explicitly
marked trust-on-first-use), ``BatchMode`` and ``IdentitiesOnly``: a changed
host key ends the sync with :class:`~gpuflow.errors.HostKeyMismatch`, an
unreachable host with :class:`~gpuflow.errors.UnreachableHost`, never a
prompt or a hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from gpuflow.errors import (
    DataError,
    HostKeyMismatch,
    RemoteCommandFailed,
    SecurityError,
    StateError,
    UnreachableHost,
    UsageError,
)
from gpuflow.ignore import PROJECT_SKIPPED_TOP_LEVEL, LocalEntry, SourceTree, scan_tree
from gpuflow.records import SSHTarget
from gpuflow.transport.ssh import key_permission_error

if TYPE_CHECKING:
    from gpuflow.records import Cluster

# A tree bigger than this is probably a mistake (a dataset or a venv inside the project).
DEFAULT_LARGE_BYTES = 1 << 30
DEFAULT_LARGE_FILES = 20_000

METHODS = ("auto", "rsync", "tar", "copy")
# `auto` runs rsync only when it can save bytes: when the plan rewrites files the
# destination already holds, this many bytes of them or more (its delta transfer
# then sends changed blocks only).  Anything else (new files: a first sync, a
# few edited sources) travels as tar inside the session that listed the
# destination: rsync could not send it in fewer bytes, and its own session costs
# a round trip (measured in bench/sync_bench.py).
RSYNC_DELTA_MIN_BYTES = 4 << 20
_COPY_CHUNK = 1 << 20
# Two syncs to one destination at once (two terminals, a laptop and CI) would interleave
# their deletions and unpacking.  Each sync holds an exclusive lock on a file beside the
# destination ("<dir>.gpuflow-sync.lock", outside the mirrored tree) for its whole
# session; a second one waits up to this long, saying so, then gives up.  Over SSH the
# lock is flock(1) held by the remote session itself, so a dropped connection frees it.
SYNC_LOCK_SUFFIX = ".gpuflow-sync.lock"
SYNC_LOCK_WAIT_SECONDS = 600
_LOCK_EXIT_CODE = 6


# --------------------------------------------------------------------------- records


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
    method: str  # "rsync" | "tar" | "copy"
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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("sent", "deleted", "skipped_links"):
            data[key] = list(data[key])
        return data

    def summary(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        text = (
            f"{verb} {self.files_sent:,} of {self.files_considered:,} files "
            f"({_human_bytes(self.bytes_sent)} of {_human_bytes(self.bytes_considered)}) "
            f"to {self.destination} via {self.method} in {self.seconds:.2f} s"
        )
        if self.files_deleted:
            text += f"; {'would delete' if self.dry_run else 'deleted'} {self.files_deleted:,}"
        return text


@dataclass(frozen=True)
class DestinationEntry:
    """One entry of the destination listing."""

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


@dataclass(frozen=True)
class SyncPlan:
    to_send: tuple[LocalEntry, ...]
    to_delete: tuple[str, ...]  # files and links, then directories deepest first

    @property
    def bytes_to_send(self) -> int:
        return sum(entry.size for entry in self.to_send)


# --------------------------------------------------------------------------- planning


def _same_mtime(local_ns: int, remote_ns: int) -> bool:
    """Equal, or equal to the second when the destination keeps only seconds."""
    if local_ns == remote_ns:
        return True
    return remote_ns % 1_000_000_000 == 0 and local_ns // 1_000_000_000 == remote_ns // 1_000_000_000


def needs_sending(local: LocalEntry, remote: DestinationEntry | None) -> bool:
    if remote is None or remote.kind != local.kind:
        return True
    if local.kind == "link":
        return remote.link_target != local.link_target
    return remote.size != local.size or remote.mode != local.mode or not _same_mtime(local.mtime_ns, remote.mtime_ns)


def _safe_relative(path: str) -> bool:
    return bool(path) and not path.startswith("/") and ".." not in path.split("/") and "\0" not in path


def plan_sync(tree: SourceTree, state: DestinationState) -> SyncPlan:
    """What to send and what to delete so the destination mirrors the tree."""
    local_paths = {entry.path for entry in tree.entries}
    to_send = tuple(entry for entry in tree.entries if needs_sending(entry, state.entries.get(entry.path)))
    if not state.listed:
        return SyncPlan(tree.entries, ())
    doomed_files: list[str] = []
    doomed_directories: list[str] = []
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
    return SyncPlan(to_send, tuple(sorted(doomed_files)) + tuple(doomed_directories))


# --------------------------------------------------------------------------- SSH plumbing


def _ssh_option_path(path: str) -> str:
    """A path as an ``-o Key=value`` value: ssh expands ``%`` tokens and
    splits on spaces unless double-quoted."""
    if '"' in path or "\n" in path:
        raise UsageError(f"unsupported character in path {path!r} for an ssh option")
    path = path.replace("%", "%%")
    return f'"{path}"' if any(character.isspace() for character in path) else path


def ssh_argv(target: SSHTarget, control_path: str | None = None) -> list[str]:
    """The ``ssh`` command line (without the host) that reaches ``target``
    with its pinned host keys and nothing from ~/.ssh/config."""
    if not target.known_hosts_path:
        raise SecurityError(
            f"no pinned host key for {target.host}:{target.port}",
            hint="the cluster's known_hosts file is missing; run `gpuflow ssh NAME` to pin the instance's key",
        )
    known_hosts = target.known_hosts_path
    argv = [
        "ssh",
        "-F",
        "none",
        "-o",
        f"UserKnownHostsFile={_ssh_option_path(str(known_hosts))}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        # accept-new (trust on first use, only when the target says so) still refuses a *changed* key.
        "StrictHostKeyChecking=" + ("accept-new" if target.trust_on_first_use else "yes"),
        "-o",
        "CheckHostIP=no",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
        "-o",
        "LogLevel=ERROR",
        "-p",
        str(target.port),
        "-l",
        target.user,
    ]
    if target.key_path:
        argv += ["-i", str(target.key_path)]
    if control_path:
        argv += ["-o", f"ControlPath={_ssh_option_path(control_path)}"]
    return argv


def _ssh_failure(target: SSHTarget, stderr: bytes, what: str) -> Exception:
    """Map an ssh exit status 255 to the domain error it means."""
    text = stderr.decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message from ssh"
    refused_key = key_permission_error(text, target.key_path)
    if refused_key is not None:
        return refused_key
    if "host key is known for" in text or "No matching host key" in text:
        return HostKeyMismatch(
            f"no key pinned in {target.known_hosts_path} for {target.host}:{target.port}; {what} refused",
            hint="pin the instance's host key first (gpuflow ssh NAME pins it from the console output)",
        )
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        return HostKeyMismatch(
            f"host key of {target.host}:{target.port} does not match the key pinned in {target.known_hosts_path}; "
            f"{what} refused",
            hint="if the instance was replaced on purpose, re-pin its key; otherwise do not connect",
        )
    if "host key for" in text and "has changed" in text:
        return HostKeyMismatch(f"host key of {target.host}:{target.port} changed; {what} refused")
    return UnreachableHost(f"cannot reach {target.host}:{target.port} over SSH for {what}: {last}")


class _SshSession:
    """One OpenSSH connection for the whole sync.

    The listing session (:class:`_Exchange`) opens it as a ControlMaster on a
    socket in a private temp directory; when rsync is used it rides on the same
    connection through that ``ControlPath`` while the listing session is kept
    open.  No ``ControlPersist``: the connection ends with the listing session,
    and nothing is left running if gpuflow is killed.
    """

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        # Short path: unix socket paths are limited to ~104 bytes on macOS.
        self._socket_directory = tempfile.mkdtemp(prefix="gpuflow-ssh-")
        self.control_path = os.path.join(self._socket_directory, "%C")
        self.base_argv = ssh_argv(target, self.control_path)

    def master_argv(self, remote_command: str) -> list[str]:
        return [*self.base_argv, "-o", "ControlMaster=yes", self.target.host, remote_command]

    def close(self) -> None:
        shutil.rmtree(self._socket_directory, ignore_errors=True)


# Searched for, not matched at the start: a login shell may print a banner first.
_PROBE_HEADER = re.compile(rb"(?:^|\n)GPUFLOW-PROBE rsync=(\d) exists=(\d) listed=(\d)\n")
_LISTING_END = b"END" + b"\0" * 6  # a 6-field record no find output can produce (kinds are one letter)

# The exchange, one remote shell session:
#   0. (unless dry-run) take the destination's sync lock on fd 9 — inherited by
#      tar / cat below, so it is held until the session ends — printing
#      GPUFLOW-SYNC-WAIT first if another sync holds it (exit 6 after the wait);
#   1. say whether rsync exists, whether the destination exists (creating it
#      unless dry-run), and list it with `find -printf` (NUL-terminated fields:
#      any file name survives), then an END record;
#   2. read one line from stdin, "<bytes> <next>": that many bytes of
#      NUL-separated paths to delete (relative, from the listing), removed
#      without following links (a directory only when empty);
#   3. <next> is "tar": unpack the rest of stdin here; "wait": stay until stdin
#      closes (rsync is using the connection meanwhile); "none": done.
# `read` takes exactly one line and `head -c` exactly <bytes>, so the tar
# stream that follows on the same stdin is untouched.
_EXCHANGE_SCRIPT = (
    "d={directory}; r=0; e=0; l=0; command -v rsync >/dev/null 2>&1 && r=1; "
    "{make}"
    "{lock}"
    "if [ -d \"$d\" ] && cd -- \"$d\"; then e=1; "
    "find . -maxdepth 0 -printf '' >/dev/null 2>&1 && l=1; fi; "
    "printf 'GPUFLOW-PROBE rsync=%s exists=%s listed=%s\\n' \"$r\" \"$e\" \"$l\"; "
    "if [ \"$l\" = 1 ]; then find . -mindepth 1 -printf '%y\\0%m\\0%s\\0%T@\\0%l\\0%P\\0' || exit 5; fi; "
    "printf 'END\\0\\0\\0\\0\\0\\0'; "
    "IFS=' ' read -r n next || exit 0; "
    "if [ \"$n\" -gt 0 ]; then [ \"$e\" = 1 ] || exit 3; "
    "head -c \"$n\" | xargs -0 -r sh -c {delete_loop} sh || exit 4; fi; "
    "if [ \"$next\" = tar ]; then [ \"$e\" = 1 ] || exit 3; "
    "exec env LC_ALL=C tar --no-same-owner -xpf - --warning=no-timestamp --warning=no-unknown-keyword; fi; "
    "if [ \"$next\" = wait ]; then exec cat >/dev/null; fi"
)
# Without flock(1) or a writable lock path the sync goes on unlocked (as before locks).
_LOCK_SCRIPT = (
    'k="${{d%/}}{suffix}"; '
    'if command -v flock >/dev/null 2>&1 && touch -- "$k" 2>/dev/null; then exec 9>>"$k"; '
    "flock -n 9 || {{ printf 'GPUFLOW-SYNC-WAIT\\n'; flock -w {wait} 9 || exit {code}; }}; fi; "
)
_SYNC_WAIT_LINE = b"GPUFLOW-SYNC-WAIT\n"
_DELETE_LOOP = (
    'for p in "$@"; do if [ -d "$p" ] && [ ! -L "$p" ]; then rmdir -- "$p" 2>/dev/null || true; '
    'else rm -f -- "$p"; fi; done'
)


def _parse_time_ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9] or 0)


_FIND_KINDS = {"f": "file", "l": "link", "d": "dir"}


def parse_find_listing(data: bytes) -> dict[str, DestinationEntry]:
    """Parse ``find -printf '%y\\0%m\\0%s\\0%T@\\0%l\\0%P\\0'`` output."""
    fields = data.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 6:
        raise RemoteCommandFailed("the destination listing was cut short; run the sync again")
    entries: dict[str, DestinationEntry] = {}
    for index in range(0, len(fields), 6):
        kind_code, mode, size, mtime, link_target, path = fields[index : index + 6]
        kind = _FIND_KINDS.get(kind_code.decode(), "other")
        name = os.fsdecode(path)
        entries[name] = DestinationEntry(
            kind=kind,
            size=int(size) if kind == "file" else 0,
            mtime_ns=_parse_time_ns(mtime.decode()),
            mode=int(mode, 8) if kind == "file" else 0,
            link_target=os.fsdecode(link_target) if kind == "link" else None,
        )
    return entries


def _tail(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip().replace("\n", " ")[-300:]


class _Exchange:
    """The sync's first (and, for tar or no change, only) remote session:
    probe and list the destination, then delete and unpack on the same stdin.

    stderr goes to a temp file, never a pipe, so a chatty remote cannot fill a
    pipe while this process is busy writing the tar stream.
    """

    def __init__(
        self, session: _SshSession, directory: str, *, create: bool, lock_wait: float = SYNC_LOCK_WAIT_SECONDS
    ) -> None:
        self.session = session
        self.directory = directory
        self.lock_wait = lock_wait
        lock = _LOCK_SCRIPT.format(suffix=SYNC_LOCK_SUFFIX, wait=f"{lock_wait:g}", code=_LOCK_EXIT_CODE)
        script = _EXCHANGE_SCRIPT.format(
            directory=shlex.quote(directory),
            make='mkdir -p -- "$d" || exit 3; ' if create else "",
            lock=lock if create else "",  # a dry run changes nothing: it need not wait
            delete_loop=shlex.quote(_DELETE_LOOP),
        )
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            session.master_argv(f"sh -c {shlex.quote(script)}"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._finished = False
        self._what = "sync"
        self._packer_failure: str | None = None

    def _failure(self, code: int, what: str) -> Exception:
        self._stderr.seek(0)
        stderr = self._stderr.read()
        if code == 255:
            return _ssh_failure(self.session.target, stderr, what)
        return RemoteCommandFailed(f"{what} failed on {self.session.target.host} (exit {code}): {_tail(stderr)}")

    def read_state(self, waiting: Callable[[str], None] = lambda message: None) -> DestinationState:
        """Read the probe header and the listing (until the END record).

        ``waiting`` hears once when another sync holds the destination's lock.
        """
        assert self.process.stdout is not None
        chunks: list[bytes] = []
        tail = b""
        told = False
        while True:
            chunk = self.process.stdout.read1(1 << 16)
            if not chunk:
                code = self.process.wait()
                self._finished = True
                if code == _LOCK_EXIT_CODE and told:
                    raise _lock_timeout(f"{self.session.target.host}:{self.directory}", self.lock_wait)
                raise self._failure(code if code else 1, "listing the destination")
            if not told and _SYNC_WAIT_LINE in b"".join(chunks[-1:]) + chunk:
                told = True
                waiting(f"another sync to {self.session.target.host}:{self.directory} is running; waiting for it to finish")
            chunks.append(chunk)
            tail = (tail + chunk)[-len(_LISTING_END) :]
            if tail == _LISTING_END:
                break
        output = b"".join(chunks)[: -len(_LISTING_END)]
        match = _PROBE_HEADER.search(output)
        if match is None:
            raise RemoteCommandFailed(f"unexpected answer from {self.session.target.host} to the sync probe")
        has_rsync, exists, listed = (value == b"1" for value in match.groups())
        entries = parse_find_listing(output[match.end() :]) if listed else {}
        return DestinationState(exists=exists, entries=entries, listed=listed or not exists, has_rsync=has_rsync)

    def finish(
        self,
        deletions: Sequence[str] = (),
        *,
        tar_source: Path | None = None,
        tar_entries: Sequence[LocalEntry] = (),
        progress: _Progress | None = None,
        keep_open: bool = False,
    ) -> None:
        """Send the deletions, then (with ``tar_source``) the tar stream of
        ``tar_entries``, and wait for the remote side; with ``keep_open`` the
        session stays up (for rsync) until :meth:`end`."""
        assert self.process.stdin is not None
        payload = b"".join(os.fsencode(path) + b"\0" for path in deletions)
        next_step = "tar" if tar_source is not None else "wait" if keep_open else "none"
        self._what = "unpacking" if tar_source is not None else "deleting removed files"
        try:
            self.process.stdin.write(f"{len(payload)} {next_step}\n".encode() + payload)
            self.process.stdin.flush()
            if tar_source is not None:
                self._packer_failure = _stream_tar(tar_source, tar_entries, self.process.stdin, progress)
        except BrokenPipeError:
            pass  # the remote side ended early: its exit status says why
        if not keep_open:
            self.end()

    def end(self) -> None:
        """Close the session's stdin, wait, and raise if the remote side failed."""
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        code = self.process.wait()
        self._finished = True
        if self._packer_failure:  # the root cause; the receiver then fails on the cut-off archive
            raise DataError(
                f"reading the files to send failed: {self._packer_failure}", hint="a file changed or vanished; sync again"
            )
        if code != 0:
            raise self._failure(code, self._what)

    def abandon(self) -> None:
        """End the session without changing anything more (dry-run, cancelled,
        error; a no-op after :meth:`end`): closing stdin makes the remote
        ``read`` see end-of-file and exit."""
        if not self._finished:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._finished = True
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


# --------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar on stderr, or nothing (not a TTY, --json, tests)."""

    def __init__(self, enabled: bool, total_bytes: int, description: str) -> None:
        self._bar = None
        self._task = None
        if enabled and total_bytes > 0:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total_bytes)

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# --------------------------------------------------------------------------- transports


def _write_file_list(paths: Sequence[str]) -> str:
    """A NUL-separated list of paths in a temp file (for ``--files-from`` / ``-T``)."""
    descriptor, list_path = tempfile.mkstemp(prefix="gpuflow-sync-", suffix=".list")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(b"".join(os.fsencode(path) + b"\0" for path in paths))
    return list_path


_RSYNC_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+\d+%")


def _send_rsync(session: _SshSession, source: Path, directory: str, plan: SyncPlan, progress: _Progress) -> None:
    list_path = _write_file_list([entry.path for entry in plan.to_send])
    remote_shell = shlex.join(session.base_argv)
    remote_directory = directory.rstrip("/") + "/"
    argv = [
        "rsync",
        "-a",
        "--no-owner",
        "--no-group",
        "-s",  # protect the remote path from the remote shell
        "--from0",
        f"--files-from={list_path}",
        "--info=progress2",
        "--no-human-readable",
        "-e",
        remote_shell,
        f"{source}/",
        f"{session.target.host}:{remote_directory}",
    ]
    errors = tempfile.TemporaryFile()  # a file, not a pipe: rsync may write much to it while we read stdout
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
        assert process.stdout is not None
        buffer = b""
        while True:
            chunk = process.stdout.read1(1 << 16)
            if not chunk:
                break
            *lines, buffer = re.split(rb"[\r\n]", buffer + chunk)
            for line in lines:
                match = _RSYNC_PROGRESS.match(line)
                if match:
                    progress.update(int(match.group(1).replace(b",", b"")))
        code = process.wait()
        errors.seek(0)
        stderr = errors.read()
    finally:
        errors.close()
        os.unlink(list_path)
    if code == 255 or b"Host key verification failed" in stderr:
        raise _ssh_failure(session.target, stderr, "sync")
    if code != 0:
        raise RemoteCommandFailed(f"rsync to {session.target.host} failed (exit {code}): {_tail(stderr)}")


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


def _stream_tar(source: Path, entries: Sequence[LocalEntry], sink: Any, progress: _Progress | None) -> str | None:
    """Write one uncompressed POSIX (pax) tar stream of ``entries`` into ``sink``.

    Written here rather than by the local ``tar``: the same bytes on Linux and
    macOS (whose bsdtar lacks GNU options), no name ever passes through an
    argument list, and each member carries the exact nanosecond mtime the plan
    compared (a pax ``mtime`` record) and the mode, so the next sync sees the
    file as unchanged.  Headers come from :meth:`tarfile.TarInfo.tobuf`; file
    bytes are copied with one reused buffer (``tarfile``'s own stream writer
    re-copies its buffer on every write, measurably slower for a 100 MB file).
    Links are archived as links; owners are left out (the receiver runs ``tar
    --no-same-owner``).  Returns what went wrong reading a file (it changed or
    vanished; the archive is then left unterminated so the receiver fails
    rather than keep a short file), else None.
    """
    import tarfile

    buffer = bytearray(_COPY_CHUNK)
    view = memoryview(buffer)
    total = 0

    def emit(data: bytes | memoryview) -> None:
        nonlocal total
        sink.write(data)  # BrokenPipeError propagates: the receiver's exit status explains it
        total += len(data)
        if progress is not None:
            progress.advance(len(data))

    for entry in entries:
        member = tarfile.TarInfo(entry.path)
        seconds, nanoseconds = divmod(entry.mtime_ns, 1_000_000_000)
        member.mtime = seconds
        member.pax_headers = {"mtime": f"{seconds}.{nanoseconds:09d}"}
        if entry.kind == "link":
            member.type = tarfile.SYMTYPE
            member.linkname = entry.link_target or ""
            member.mode = 0o777
            emit(member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            continue
        member.mode = entry.mode
        member.size = entry.size
        try:
            handle = open(source / entry.path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            return f"{entry.path!r}: {exc.strerror or exc}"
        with handle:
            emit(member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            remaining = entry.size
            while remaining:
                count = handle.readinto(view[: min(remaining, _COPY_CHUNK)])
                if not count:
                    return f"{entry.path!r}: it shrank while being sent"
                emit(view[:count])
                remaining -= count
        emit(bytes(-entry.size % _TAR_BLOCK))
    emit(bytes(2 * _TAR_BLOCK))  # end of archive
    emit(bytes(-total % _TAR_RECORD))
    return None


def list_local_destination(directory: Path) -> DestinationState:
    """The same listing the SSH probe produces, for a local directory."""
    if not directory.is_dir():
        return DestinationState(exists=False)
    entries: dict[str, DestinationEntry] = {}
    pending = [""]
    while pending:
        relative_directory = pending.pop()
        absolute_directory = directory / relative_directory if relative_directory else directory
        with os.scandir(absolute_directory) as iterator:
            for item in iterator:
                relative_path = f"{relative_directory}/{item.name}" if relative_directory else item.name
                status = item.stat(follow_symlinks=False)
                if stat.S_ISLNK(status.st_mode):
                    entries[relative_path] = DestinationEntry(
                        "link", 0, status.st_mtime_ns, 0, os.readlink(item.path)
                    )
                elif stat.S_ISDIR(status.st_mode):
                    entries[relative_path] = DestinationEntry("dir", 0, status.st_mtime_ns)
                    pending.append(relative_path)
                elif stat.S_ISREG(status.st_mode):
                    entries[relative_path] = DestinationEntry(
                        "file", status.st_size, status.st_mtime_ns, stat.S_IMODE(status.st_mode)
                    )
                else:
                    entries[relative_path] = DestinationEntry("other", 0, status.st_mtime_ns)
    return DestinationState(exists=True, entries=entries, has_rsync=False)


def _inside(directory_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == directory_real or real.startswith(directory_real + os.sep)


def _apply_local(source: Path, destination: Path, plan: SyncPlan, progress: _Progress) -> None:
    """Delete, then copy each planned entry via a temp file + rename; never
    writes through a link (every parent is checked to resolve inside)."""
    destination.mkdir(parents=True, exist_ok=True)
    destination_real = os.path.realpath(destination)
    for path in plan.to_delete:
        target = destination / path
        if not _inside(destination_real, os.path.dirname(target)):
            raise SecurityError(f"refusing to delete {target}: it resolves outside {destination}")
        try:
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            else:
                target.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a directory still holding ignored files stays
    for entry in plan.to_send:
        target = destination / entry.path
        existing_ancestor = target.parent
        while not existing_ancestor.exists() and existing_ancestor != destination:
            existing_ancestor = existing_ancestor.parent
        if not _inside(destination_real, str(existing_ancestor)):  # checked before mkdir can follow a link
            raise SecurityError(f"refusing to write {target}: it resolves outside {destination}")
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / f".{target.name}.gpuflow-sync.tmp"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        if entry.kind == "link":
            os.symlink(entry.link_target or "", temporary)
        else:
            with open(source / entry.path, "rb") as reader, open(temporary, "wb") as writer:
                while True:
                    chunk = reader.read(_COPY_CHUNK)
                    if not chunk:
                        break
                    writer.write(chunk)
                    progress.advance(len(chunk))
            os.chmod(temporary, entry.mode)
            os.utime(temporary, ns=(entry.mtime_ns, entry.mtime_ns))
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # planned for deletion but still held ignored files
        os.replace(temporary, target)


# --------------------------------------------------------------------------- use cases


def _stderr_warning(message: str) -> None:
    print(f"gpuflow: warning: {message}", file=sys.stderr)


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


@dataclass(frozen=True)
class _Options:
    """The caller's choices for one sync, passed whole to the transports."""

    method: str
    dry_run: bool
    progress: bool
    large_bytes: int
    large_files: int
    confirm_large: Callable[[str], bool] | None
    warn: Callable[[str], None]
    lock_wait: float = SYNC_LOCK_WAIT_SECONDS


def sync_directory(
    source: Path,
    destination: Destination,
    *,
    method: str = "auto",
    dry_run: bool = False,
    progress: bool = False,
    skip_top_level: Sequence[str] = (),
    large_bytes: int = DEFAULT_LARGE_BYTES,
    large_files: int = DEFAULT_LARGE_FILES,
    confirm_large: Callable[[str], bool] | None = None,
    warn: Callable[[str], None] = _stderr_warning,
    lock_wait: float = SYNC_LOCK_WAIT_SECONDS,
) -> SyncReport:
    """Make ``destination`` mirror ``source`` (after ignore rules); send only changes.

    ``method``: ``auto`` (over SSH: tar in the listing session, rsync when its
    delta transfer can save bytes and both ends have it; a Python copy for a
    local destination), or force ``rsync``/``tar``/``copy``.
    ``skip_top_level``: names skipped at the root besides the ignore rules.
    ``confirm_large`` is asked (with a one-line description) before sending
    more than ``large_bytes`` or ``large_files``; without it the sync warns
    through ``warn`` and goes on.  Another sync to the same destination is waited
    for, up to ``lock_wait`` seconds (see SYNC_LOCK_SUFFIX).  Returns a :class:`SyncReport`.
    """
    if method not in METHODS:
        raise UsageError(f"unknown sync method {method!r}", hint=f"use one of {', '.join(METHODS)}")
    local = isinstance(destination, LocalDestination)
    if local and method not in ("auto", "copy"):
        raise UsageError(f"method {method!r} needs an SSH destination; a local directory uses 'copy'")
    if not local and method == "copy":
        raise UsageError("method 'copy' is for a local destination; over SSH use rsync or tar")
    source = Path(source).expanduser()
    if not source.is_dir():
        raise DataError(f"cannot sync {source}: not a directory")
    started = time.perf_counter()
    options = _Options(method, dry_run, progress, large_bytes, large_files, confirm_large, warn, lock_wait)

    def scan() -> SourceTree:
        tree = scan_tree(source, skip_top_level=skip_top_level)
        for link in tree.skipped_links[:3]:
            warn(f"not sending symlink {link!r}: it is absolute or leads outside {source}")
        return tree

    if local:
        return _sync_local(scan, destination, options, started)
    return _sync_ssh(scan, destination, options, started)


def _check_size(plan: SyncPlan, destination: Destination, options: _Options) -> None:
    if plan.bytes_to_send <= options.large_bytes and len(plan.to_send) <= options.large_files:
        return
    message = (
        f"about to send {len(plan.to_send):,} files ({_human_bytes(plan.bytes_to_send)}) to {destination.describe()}; "
        "list big paths in .gpuflowignore, or sync data once with `gpuflow sync --data PATH`"
    )
    if options.confirm_large is None:
        options.warn(message)
    elif not options.confirm_large(message):
        raise UsageError("sync cancelled", hint="add large paths to .gpuflowignore, or pass --yes")


def _report(
    tree: SourceTree, destination: Destination, method: str, plan: SyncPlan, started: float, dry_run: bool
) -> SyncReport:
    return SyncReport(
        source=str(tree.root),
        destination=destination.describe(),
        method=method,
        files_considered=len(tree.entries),
        bytes_considered=tree.total_bytes,
        files_sent=len(plan.to_send),
        bytes_sent=plan.bytes_to_send,
        files_deleted=len(plan.to_delete),
        seconds=time.perf_counter() - started,
        dry_run=dry_run,
        sent=tuple(entry.path for entry in plan.to_send),
        deleted=plan.to_delete,
        skipped_links=tree.skipped_links,
    )


def _lock_timeout(where: str, waited: float) -> StateError:
    return StateError(
        f"another sync to {where} still holds its lock after {waited:g} s",
        hint="let it finish (or stop it) and sync again",
    )


@contextlib.contextmanager
def _local_sync_lock(directory: Path, warn: Callable[[str], None], wait_seconds: float) -> Iterator[None]:
    """Hold ``<directory>.gpuflow-sync.lock`` exclusively (see SYNC_LOCK_SUFFIX)."""
    import fcntl

    lock_path = directory.parent / (directory.name + SYNC_LOCK_SUFFIX)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock_file:
        deadline = time.monotonic() + wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _lock_timeout(str(directory), wait_seconds) from None
                if not told:
                    warn(f"another sync to {directory} is running; waiting for it to finish")
                    told = True
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _sync_local(
    scan: Callable[[], SourceTree], destination: LocalDestination, options: _Options, started: float
) -> SyncReport:
    tree = scan()
    directory = Path(destination.directory)
    if options.dry_run:
        plan = plan_sync(tree, list_local_destination(directory))
        return _report(tree, destination, "copy", plan, started, True)
    with _local_sync_lock(directory, options.warn, options.lock_wait):
        # Listed under the lock: a sync that waited sees what the other one left.
        plan = plan_sync(tree, list_local_destination(directory))
        _check_size(plan, destination, options)
        bar = _Progress(options.progress, plan.bytes_to_send, "sync")
        try:
            _apply_local(tree.root, directory, plan, bar)
        finally:
            bar.close()
    return _report(tree, destination, "copy", plan, started, False)


def _delta_basis_bytes(plan: SyncPlan, state: DestinationState) -> int:
    """Bytes of planned files the destination already has an older version of:
    what rsync's delta transfer could avoid resending."""
    total = 0
    for entry in plan.to_send:
        existing = state.entries.get(entry.path)
        if entry.kind == "file" and existing is not None and existing.kind == "file" and existing.size:
            total += entry.size
    return total


def _local_rsync_usable() -> bool:
    """An rsync here that speaks protocol 31+ (3.1+: ``--info=progress2``,
    ``--from0``); macOS ships rsync 2.6.9 or openrsync, which do not."""
    path = shutil.which("rsync")
    if path is None:
        return False
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    match = re.search(r"protocol version (\d+)", version)
    return match is not None and int(match.group(1)) >= 31


def _sync_ssh(
    scan: Callable[[], SourceTree], destination: SSHDestination, options: _Options, started: float
) -> SyncReport:
    if shutil.which("ssh") is None:
        raise UsageError("the OpenSSH client `ssh` is not installed", hint="install openssh-client")
    session = _SshSession(destination.target)
    exchange = None
    try:
        # Connect first and scan while the handshake runs: the scan is then free.
        exchange = _Exchange(session, destination.directory, create=not options.dry_run, lock_wait=options.lock_wait)
        tree = scan()
        state = exchange.read_state(waiting=options.warn)
        if not state.listed:
            options.warn(f"cannot list {destination.describe()} (no GNU find there): sending every file, deleting none")
        if options.method == "rsync" and not (state.has_rsync and _local_rsync_usable()):
            raise UsageError("rsync 3.1+ is missing on this machine or rsync on the target", hint="use --method tar")
        plan = plan_sync(tree, state)
        if options.method == "auto":
            worth_a_delta = _delta_basis_bytes(plan, state) >= RSYNC_DELTA_MIN_BYTES
            chosen = "rsync" if worth_a_delta and state.has_rsync and _local_rsync_usable() else "tar"
        else:
            chosen = options.method
        if options.dry_run:
            return _report(tree, destination, chosen, plan, started, True)
        _check_size(plan, destination, options)
        bar = _Progress(options.progress, plan.bytes_to_send, f"sync ({chosen})")
        try:
            if chosen == "rsync" and plan.to_send:
                # Keep the listing session (the connection's master) open while rsync rides on it.
                exchange.finish(plan.to_delete, keep_open=True)
                _send_rsync(session, tree.root, destination.directory, plan, bar)
                exchange.end()
            elif plan.to_send:
                exchange.finish(plan.to_delete, tar_source=tree.root, tar_entries=plan.to_send, progress=bar)
            else:
                exchange.finish(plan.to_delete)
        finally:
            bar.close()
        return _report(tree, destination, chosen, plan, started, False)
    finally:
        if exchange is not None:
            exchange.abandon()
        session.close()


# --------------------------------------------------------------------------- clusters


def destination_for(cluster: Cluster, subdirectory: str) -> Destination:
    """Where ``<base>/<subdirectory>`` of a cluster's head node is, for sync.

    * a sandbox cluster without a loopback sshd: its LocalRunner directory
      ``$GPUFLOW_HOME/sandbox/<cluster>/<instance-id>`` on this machine;
    * a sandbox cluster with one (``GPUFLOW_SANDBOX_SSH``): that directory,
      reached through the loopback sshd, as a real instance would be;
    * a real instance: ``gpuflow/<subdirectory>`` under the login home, i.e.
      ``$HOME/gpuflow``, the SSH runner's base directory.

    Host keys are pinned before the system ``ssh`` runs (from the console
    output, by :func:`gpuflow.remote.ensure_host_keys`); when the console
    printed only fingerprints, one connection through the SSH runner, which
    accepts exactly a key with such a fingerprint, pins the key first.
    """
    from gpuflow import remote
    from gpuflow.transport.local import LocalRunner

    node = cluster.head
    if cluster.sandbox:
        runner = remote.runner_for(cluster, node)  # pins a configured loopback sshd's key; connects lazily
        try:
            if isinstance(runner, LocalRunner):
                return LocalDestination(Path(runner.base_dir) / subdirectory)
        finally:
            runner.close()
        directory = remote.sandbox_directory(cluster, node)
        return SSHDestination(remote.ssh_target_for(cluster, node), f"{directory}/{subdirectory}")
    target = remote.ssh_target_for(cluster, node)
    if remote.ensure_host_keys(cluster, node, target):
        runner = remote.runner_for(cluster, node)
        try:
            runner.run(["true"])
        finally:
            runner.close()
    return SSHDestination(target, f"gpuflow/{subdirectory}")


def sync_project(cluster: Cluster, project_dir: Path, **options: Any) -> SyncReport:
    """Push the project to ``<base>/project/`` (the top-level ``runs/`` stays home)."""
    options.setdefault("skip_top_level", tuple(PROJECT_SKIPPED_TOP_LEVEL))
    return sync_directory(Path(project_dir), destination_for(cluster, "project"), **options)


def data_name(data_dir: Path) -> str:
    """The remote name of a data directory: its basename, which must be a plain name."""
    from gpuflow.state import validate_name

    return validate_name(Path(data_dir).expanduser().resolve().name, "data directory name")


def sync_data(cluster: Cluster, data_dir: Path, **options: Any) -> SyncReport:
    """Push a data directory to ``<base>/data/<basename>/``, where later runs find it."""
    return sync_directory(Path(data_dir), destination_for(cluster, f"data/{data_name(data_dir)}"), **options)



def sync_cluster(
    cluster_name: str | None = None,
    *,
    data_dir: Path | None = None,
    project_dir: Path | None = None,
    **options: Any,
) -> SyncReport:
    """The ``gpuflow sync`` use case: the project (or ``data_dir``) to a cluster.

    The cluster defaults as everywhere (the project's ``cluster`` setting, else
    the only cluster).  The large-tree thresholds come from the project
    settings ``sync_warn_gb`` (default 1) and ``sync_warn_files`` (default
    20000) unless given.
    """
    from gpuflow.config import load_project_config
    from gpuflow.errors import ConfigError
    from gpuflow.remote import load_cluster

    config = load_project_config(project_dir)
    try:
        options.setdefault("large_bytes", int(float(config.get("sync_warn_gb", DEFAULT_LARGE_BYTES / 1e9)) * 1e9))
        options.setdefault("large_files", int(config.get("sync_warn_files", DEFAULT_LARGE_FILES)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.source}: sync_warn_gb / sync_warn_files must be numbers") from exc
    if cluster_name is None:
        from gpuflow.clusters import resolve_cluster_name

        cluster_name = resolve_cluster_name(None, project_dir=config.root)
    cluster = load_cluster(cluster_name)
    if data_dir is not None:
        return sync_data(cluster, Path(data_dir), **options)
    return sync_project(cluster, config.root, **options)
