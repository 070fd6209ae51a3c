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
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

STREAMER_PY = r"""
import hashlib, os, stat, struct, sys
root_fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
out = open(sys.stdout.fileno(), "wb", buffering=1 << 18, closefd=False)  # few, large SSH packets
buffer = bytearray(1 << 20)
view = memoryview(buffer)
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
def refuse(reason):
    data = reason.encode("utf-8", "replace")[:4000]
    out.write(b"E" + struct.pack(">H", len(data)) + data)
held_parent, held_fd = None, None  # the last file's directory, kept open: files come grouped by directory
for name in sys.stdin.buffer.read().split(b"\0"):
    if not name:
        continue
    parts = name.split(b"/")
    if any(part in (b"", b".", b"..") for part in parts):
        refuse("not a plain relative path")
        continue
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
        continue
    with open(descriptor, "rb", buffering=0) as handle:
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            refuse("not a regular file")
            continue
        size = before.st_size
        out.write(b"F" + struct.pack(">Q", size))
        digest = hashlib.sha256()
        remaining, changed = size, False
        while remaining:
            count = handle.readinto(view[: min(remaining, len(buffer))])
            if not count:
                changed = True
                out.write(bytes(remaining))
                break
            digest.update(view[:count])
            out.write(view[:count])
            remaining -= count
        after = os.fstat(descriptor)
        changed = changed or after.st_size != size or after.st_mtime_ns != before.st_mtime_ns
        out.write(digest.digest() + (b"\1" if changed else b"\0"))
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
    frames = _Frames(recv)
    for relative, temporary in items:
        tag = frames.exact(1)
        if tag == b"E":
            (length,) = struct.unpack(">H", frames.exact(2))
            yield Fetched(relative, None, frames.exact(length).decode("utf-8", "replace"))
            continue
        if tag != b"F":
            raise StreamBroken(f"unexpected frame {tag!r} in the file stream")
        (size,) = struct.unpack(">Q", frames.exact(8))
        digest = hashlib.sha256()
        try:
            descriptor = _create(temporary)  # exclusive: never through a planted link
            try:
                for piece in frames.chunks(size):  # hashed as it lands, no copy
                    digest.update(piece)
                    _write_all(descriptor, piece)
            finally:
                os.close(descriptor)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        trailer = frames.exact(33)
        if trailer[32:] != b"\0":
            yield Fetched(relative, None, "it changed while being read")
        elif trailer[:32] != digest.digest():
            yield Fetched(relative, None, "its bytes arrived damaged")
        else:
            yield Fetched(relative, digest.hexdigest())
    if frames.exact(1) != b"Z":
        raise StreamBroken("the file stream did not end where expected")
