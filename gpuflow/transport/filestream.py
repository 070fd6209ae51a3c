"""Many remote files in one stream: the remote streamer and the local receiver.

A pull of 2,000 small files over SFTP costs several round trips per file; one
command whose stdout carries every file costs one.  The streamer
(:data:`STREAMER_PY`, run by the target's Python with the directory as its
argument and the NUL-separated relative paths on stdin) answers each path in
order with one frame:

* ``F`` + size (8 bytes, big-endian) + exactly that many bytes + the sha256 of
  what it read (32 bytes) + a flag byte (1: the file changed while it was read
  -- it shrank, grew or its mtime moved -- so its bytes are not a snapshot);
* ``E`` + length (2 bytes) + a UTF-8 reason: missing, not a regular file, or a
  path with a symlinked or ``..`` component.  Every component is opened
  relative to its parent with ``O_NOFOLLOW``: no link is ever followed;

and ends the stream with ``Z``.  :func:`receive` writes each ``F`` frame into
the local temporary path it was given (created exclusively: never through a
planted link), hashing while it writes, and yields the sha256 of what landed
there (None for a changed or refused file); the caller compares it with the
listing's and places the file atomically.

With ``--session NAME...`` after the directory, one streamer serves a whole pull
(:class:`Session`): it first sends ``L`` + length (8 bytes) + the JSON listing
of NAMEs (path, kind, size, mtime; never following a link), then answers
requests on stdin until it ends -- ``H`` or ``F`` + length (8 bytes) + NUL-separated
paths: ``H`` the sha256 of each (``S`` + sha256 + flag byte, or ``E``; for the
files a local copy is there for), ``F`` the files as above -- each request's
answers ended by ``Z``.  A listed file whose size or mtime moved between the
listing and the read is flagged as changed: one listing, one process, one
channel for the whole pull.  ``--push-session`` instead of ``--session``: right
after the listing, every listed file follows unasked (as the answer to an ``F``
request for them, in listing order, ended by ``Z``), so that the bytes flow while
the receiver decides where they go.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable
from dataclasses import dataclass

# The one listing of a run directory, for both scripts below: never following a link,
# each entry {path, kind (file / dir / symlink / other), size, mtime}, a file's sha256 when
# ``hashed`` (None: every file) holds its path; ``listed`` gets each file's (size, mtime_ns).
_LISTING_PY = r"""
import hashlib, json, os, stat, sys
def listing(root, names, hashed=None, listed=None):
    entries = []
    def add(relative):
        path = os.path.join(root, relative)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        entry = {"path": relative, "size": info.st_size, "mtime": info.st_mtime}
        if stat.S_ISLNK(info.st_mode):
            entry["kind"] = "symlink"
        elif stat.S_ISDIR(info.st_mode):
            entry["kind"] = "dir"
            entries.append(entry)
            for name in sorted(os.listdir(path)):
                add(relative + "/" + name)
            return
        elif stat.S_ISREG(info.st_mode):
            entry["kind"] = "file"
            if listed is not None:
                listed[os.fsencode(relative)] = (info.st_size, info.st_mtime_ns)
            if hashed is None or relative in hashed:
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                entry["sha256"] = digest.hexdigest()
        else:
            entry["kind"] = "other"
        entries.append(entry)
    for name in names:
        add(name)
    return json.dumps(entries).encode()
"""

# argv: RUN_DIR [--hash-listed] NAME... -- prints the JSON listing of NAMEs under RUN_DIR;
# each file's sha256 too, or with --hash-listed only of the NUL-separated paths on stdin.
LIST_TREE_PY = _LISTING_PY + r"""
root, names, hashed = sys.argv[1], sys.argv[2:], None
if names[:1] == ["--hash-listed"]:
    names = names[1:]
    hashed = set(os.fsdecode(name) for name in sys.stdin.buffer.read().split(b"\0") if name)
sys.stdout.buffer.write(listing(root, names, hashed) + b"\n")
"""

STREAMER_PY = _LISTING_PY + r"""
import struct
root = sys.argv[1]
try:
    root_fd, root_error = os.open(root, os.O_RDONLY | os.O_DIRECTORY), ""
except OSError as exc:  # no run directory: a session lists nothing, refuses every file
    root_fd, root_error = None, exc.strerror or str(exc)
out = open(sys.stdout.fileno(), "wb", buffering=1 << 18, closefd=False)  # few, large SSH packets
buffer = bytearray(1 << 20)
view = memoryview(buffer)
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
def refuse(reason):
    data = reason.encode("utf-8", "replace")[:4000]
    out.write(b"E" + struct.pack(">H", len(data)) + data)
listed = {}  # a session's listed files: (size, mtime_ns) then; a file not so when read has changed
held_parent, held_fd = None, None  # the last file's directory, kept open: files come grouped by directory
def answer(name, send):
    global held_parent, held_fd
    parts = name.split(b"/")
    if any(part in (b"", b".", b"..") for part in parts):
        refuse("not a plain relative path")
        return
    if root_fd is None:
        refuse(root_error)
        return
    parent = b"/".join(parts[:-1])
    try:
        if parent != held_parent:
            if held_fd is not None:
                os.close(held_fd)
            held_parent, held_fd = None, None
            directory = root_fd
            try:
                for part in parts[:-1]:
                    opened = os.open(part, DIRECTORY, dir_fd=directory)
                    if directory != root_fd:
                        os.close(directory)
                    directory = opened
            except BaseException:
                if directory != root_fd:
                    os.close(directory)
                raise
            if directory != root_fd:
                held_parent, held_fd = parent, directory
        descriptor = os.open(parts[-1], FILE, dir_fd=held_fd if held_fd is not None else root_fd)
    except OSError as exc:
        refuse(exc.strerror or str(exc))
        return
    with open(descriptor, "rb", buffering=0) as handle:
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            refuse("not a regular file")
            return
        size = before.st_size
        out.write(b"F" + struct.pack(">Q", size) if send else b"S")
        digest = hashlib.sha256()
        remaining, changed = size, False
        while remaining:
            count = handle.readinto(view[: min(remaining, len(buffer))])
            if not count:
                changed = True
                if send:
                    out.write(bytes(remaining))
                break
            digest.update(view[:count])
            if send:
                out.write(view[:count])
            remaining -= count
        after = os.fstat(descriptor)
        changed = changed or after.st_size != size or after.st_mtime_ns != before.st_mtime_ns
        changed = changed or listed.get(name, (size, before.st_mtime_ns)) != (size, before.st_mtime_ns)
        out.write(digest.digest() + (b"\1" if changed else b"\0"))
stdin = sys.stdin.buffer
if sys.argv[2:3] in (["--session"], ["--push-session"]):
    data = listing(root, sys.argv[3:], hashed=(), listed=listed)
    out.write(b"L" + struct.pack(">Q", len(data)) + data)
    out.flush()
    if sys.argv[2] == "--push-session":  # every listed file at once, in listing order, as if asked for
        for name in list(listed):
            answer(name, True)
        out.write(b"Z")
        out.flush()
    while len(header := stdin.read(9)) == 9:
        payload = stdin.read(struct.unpack(">Q", header[1:])[0])
        for name in payload.split(b"\0"):
            if name:
                answer(name, header[:1] == b"F")
        out.write(b"Z")
        out.flush()
else:
    if root_fd is None:
        sys.exit(f"{root}: {root_error}")
    for name in stdin.read().split(b"\0"):
        if name:
            answer(name, True)
    out.write(b"Z")
    out.flush()
"""

_CHUNK = 1 << 20


class StreamBroken(EOFError):
    """The stream ended or broke its framing before the streamer's end mark."""


@dataclass(frozen=True)
class Fetched:
    """One requested file: the sha256 of the bytes now at its temporary path, or
    None (``reason`` says why) when nothing usable landed there."""

    relative: str
    sha256: str | None
    reason: str = ""


class _Frames:
    """Exact reads over a ``recv(n)`` that returns up to n bytes (b'' at the end);
    always asks for a large piece, so that small frames cost no extra reads."""

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._buffer = b""
        self._at = 0  # where the unread part of _buffer starts (slicing a 1 MB piece per frame would copy it)

    def _fill(self) -> None:
        piece = self._recv(_CHUNK)
        if not piece:
            raise StreamBroken("the file stream ended early")
        self._buffer, self._at = self._buffer[self._at :] + piece, 0

    def chunks(self, count: int) -> Iterator[bytes]:
        """``count`` bytes, in the pieces they arrive in (views into the buffer)."""
        while count:
            if self._at == len(self._buffer):
                self._fill()
            end = min(len(self._buffer), self._at + count)
            piece = memoryview(self._buffer)[self._at : end]
            self._at = end
            count -= len(piece)
            yield piece

    def exact(self, count: int) -> bytes:
        while len(self._buffer) - self._at < count:
            self._fill()
        data = self._buffer[self._at : self._at + count]
        self._at += count
        return data


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create(path: str) -> int:
    """A descriptor of ``path`` created anew for writing (mode 0o666 less the umask, as
    ``open``): whatever was at that name (a stale part, a planted link) is removed
    first, never written through (``O_EXCL`` refuses to follow a link there)."""
    try:
        return os.open(path, _CREATE, 0o666)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, _CREATE, 0o666)


def _write_all(descriptor: int, data: memoryview) -> None:
    while data:
        data = data[os.write(descriptor, data) :]


def request(relatives: Sequence[str]) -> bytes:
    """The streamer's stdin for ``relatives``."""
    return b"".join(os.fsencode(relative) + b"\0" for relative in relatives)


def receive(recv: Callable[[int], bytes], items: Sequence[tuple[str, str]]) -> Iterator[Fetched]:
    """Read the streamer's answer to ``items`` ((relative, local temporary path),
    in the order requested) from ``recv``, writing each file to its temporary
    path; yields one :class:`Fetched` per item as soon as its bytes are there.
    Raises :class:`StreamBroken` when the stream ends before its end mark."""
    return _answers(_Frames(recv), items)


def _answers(frames: _Frames, items: Sequence[tuple[str, str | None]]) -> Iterator[Fetched]:
    for relative, temporary in items:
        tag = frames.exact(1)
        if tag == b"E":
            (length,) = struct.unpack(">H", frames.exact(2))
            yield Fetched(relative, None, frames.exact(length).decode("utf-8", "replace"))
            continue
        if tag != b"F":
            raise StreamBroken(f"unexpected frame {tag!r} in the file stream")
        (size,) = struct.unpack(">Q", frames.exact(8))
        if temporary is None:  # pushed but not wanted here: read past it, write nothing
            for _piece in frames.chunks(size):
                pass
            frames.exact(33)
            yield Fetched(relative, None, "not asked for")
            continue
        digest = hashlib.sha256()
        try:
            descriptor = _create(temporary)  # exclusive: never through a planted link
            try:
                for piece in frames.chunks(size):  # hashed as it lands, no copy
                    digest.update(piece)
                    _write_all(descriptor, piece)
            finally:
                os.close(descriptor)
            trailer = frames.exact(33)  # a stream cut inside the trailer leaves no part file either
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        if trailer[32:] != b"\0":
            yield Fetched(relative, None, "it changed while being read")
        elif trailer[:32] != digest.digest():
            yield Fetched(relative, None, "its bytes arrived damaged")
        else:
            yield Fetched(relative, digest.hexdigest())
    if frames.exact(1) != b"Z":
        raise StreamBroken("the file stream did not end where expected")


class Session:
    """One streamer run for a whole pull (``STREAMER_PY ROOT --session NAME...``): its
    listing of NAMEs (path, kind, size, mtime; never following a link), then any
    number of requests on the same channel -- the sha256 of files a local copy is
    there for, and the files to fetch -- each answered in order and ended by ``Z``.

    ``pushed`` (``--push-session``, for a pull with no local copy to compare with): the
    streamer sends every listed file right after the listing, unasked, so the bytes flow
    while this side plans where they go; the first :meth:`fetch` takes them (those it was
    not asked for are read past, never written) and asks only for the rest.

    ``send`` writes to the streamer's stdin, ``recv`` reads its stdout; closing
    its stdin ends it."""

    def __init__(self, send: Callable[[bytes], object], recv: Callable[[int], bytes], *, pushed: bool = False) -> None:
        self._send = send
        self._frames = _Frames(recv)
        if self._frames.exact(1) != b"L":
            raise StreamBroken("the file stream did not start with its listing")
        (length,) = struct.unpack(">Q", self._frames.exact(8))
        try:
            listing = json.loads(self._frames.exact(length))
        except ValueError as exc:
            raise StreamBroken("the remote listing is unreadable") from exc
        if not isinstance(listing, list) or not all(isinstance(entry, dict) for entry in listing):
            raise StreamBroken("the remote listing is not a list of entries")
        self.listing: list[dict] = listing
        # The files on their way (each listed file once, in listing order, as the streamer sends them).
        self._pushed: list[str] | None = (
            list(dict.fromkeys(str(entry.get("path")) for entry in listing if entry.get("kind") == "file"))
            if pushed else None
        )

    @property
    def pushed(self) -> bool:
        """Whether the listed files are on their way, not yet taken by :meth:`fetch`."""
        return self._pushed is not None

    def _ask(self, operation: bytes, relatives: Sequence[str]) -> None:
        payload = request(relatives)
        self._send(operation + struct.pack(">Q", len(payload)) + payload)

    def _end(self) -> None:
        if self._frames.exact(1) != b"Z":
            raise StreamBroken("the file stream did not end where expected")

    def hashes(self, relatives: Sequence[str]) -> dict[str, str]:
        """relative -> sha256 on the remote side, for those of ``relatives`` that are
        plain files there and did not change while they were read."""
        if not relatives:
            return {}
        self.finish()  # answers come in order: the pushed files first
        self._ask(b"H", relatives)
        found: dict[str, str] = {}
        for relative in relatives:
            tag = self._frames.exact(1)
            if tag == b"E":
                (length,) = struct.unpack(">H", self._frames.exact(2))
                self._frames.exact(length)
                continue
            if tag != b"S":
                raise StreamBroken(f"unexpected frame {tag!r} in the file stream")
            trailer = self._frames.exact(33)
            if trailer[32:] == b"\0":
                found[relative] = trailer[:32].hex()
        self._end()
        return found

    def fetch(self, items: Sequence[tuple[str, str]]) -> Iterator[Fetched]:
        """As :func:`receive`, on this session's stream: the pushed files first (the
        first call; in listing order), then one request for the rest (in ``items``' order)."""
        if self._pushed is not None:
            pushed, self._pushed = self._pushed, None
            wanted: dict[str, str] = {}
            for relative, temporary in items:
                wanted.setdefault(relative, temporary)
            for fetched in _answers(self._frames, [(relative, wanted.get(relative)) for relative in pushed]):
                if fetched.relative in wanted:
                    yield fetched
            taken = set(pushed)
            items = [(relative, temporary) for relative, temporary in items if relative not in taken]
        if not items:
            return
        self._ask(b"F", [relative for relative, _temporary in items])
        yield from _answers(self._frames, items)

    def finish(self) -> None:
        """Read past pushed files no :meth:`fetch` took (the stream is then at a request's turn)."""
        if self._pushed is not None:
            for _fetched in self.fetch(()):
                pass


class PullStream(Protocol):
    """What a pull needs of one streamer run (:class:`Session`, or a runner's wrapper of it)."""

    listing: list[dict]

    @property
    def pushed(self) -> bool: ...

    def hashes(self, relatives: Sequence[str]) -> dict[str, str]: ...

    def fetch(self, items: Sequence[tuple[str, str]]) -> Iterator[Fetched]: ...


@runtime_checkable
class StreamsPulls(Protocol):
    """A runner that can run a whole pull in one streamer (:class:`Session`): the SSH
    runner.  Others list, hash and fetch with separate commands."""

    def pull_session(
        self, remote_dir: str, names: Sequence[str], *, push: bool = False
    ) -> AbstractContextManager[PullStream]: ...
