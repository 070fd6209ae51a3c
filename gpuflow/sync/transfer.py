"""How planned files travel over SSH: the tar stream gpuflow writes itself, and rsync on the sync's connection."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpuflow.errors import RemoteCommandFailed
from gpuflow.sync.ignore import LocalEntry
from gpuflow.sync.plan import SyncPlan
from gpuflow.sync.progress import Progress
from gpuflow.sync.session import SshSession, ssh_failure, tail

COPY_CHUNK = 1 << 20


def _write_file_list(paths: Sequence[str]) -> str:
    """A NUL-separated list of paths in a temp file (for ``--files-from`` / ``-T``)."""
    descriptor, list_path = tempfile.mkstemp(prefix="gpuflow-sync-", suffix=".list")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(b"".join(os.fsencode(path) + b"\0" for path in paths))
    return list_path


_RSYNC_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+\d+%")


def send_rsync(session: SshSession, source: Path, directory: str, plan: SyncPlan, progress: Progress) -> None:
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
        raise ssh_failure(session.target, stderr, "sync")
    if code != 0:
        raise RemoteCommandFailed(f"rsync to {session.target.host} failed (exit {code}): {tail(stderr)}")


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
_USTAR_NAME_MAX = 100
_USTAR_SIZE_MAX = 8**11 - 1  # 11 octal digits
# The fixed tail of a ustar header (after typeflag and linkname): magic, version,
# empty owner names, no device numbers, empty prefix, padding -- as tarfile writes it.
_USTAR_TAIL = b"ustar\x0000" + bytes(64) + bytes(16) + bytes(155 + 12)
_ZERO_IDS = b"0000000\x00" * 2  # uid, gid


def _ustar_header(name: bytes, mode: int, size: int, mtime: int, typeflag: bytes, linkname: bytes) -> bytes:
    """One 512-byte ustar header, field for field what :meth:`tarfile.TarInfo.tobuf`
    writes (checked by tests/sync/test_tar_headers.py)."""
    before = (
        name.ljust(100, b"\0")
        + b"%07o\x00" % mode
        + _ZERO_IDS
        + b"%011o\x00" % size
        + b"%011o\x00" % mtime
    )
    after = typeflag + linkname.ljust(100, b"\0") + _USTAR_TAIL
    checksum = sum(before) + sum(after) + 8 * 32  # the checksum field counts as spaces
    return before + b"%06o\x00 " % checksum + after


def _pax_mtime_header(seconds: int, nanoseconds: int) -> bytes:
    """A pax extended header (``x``) holding only the exact mtime."""
    body = b" mtime=%d.%09d\n" % (seconds, nanoseconds)
    length = len(body) + 1
    while length != len(body) + len(b"%d" % length):  # the length counts its own digits
        length += 1
    record = b"%d" % length + body
    header = _ustar_header(b"././@PaxHeader", 0, len(record), 0, b"x", b"")
    return header + record + bytes(-len(record) % _TAR_BLOCK)


def _fast_name(text: str) -> bytes | None:
    """``text`` as a ustar name field when it needs no pax record (ASCII, short), else None."""
    if len(text) > _USTAR_NAME_MAX or not text.isascii():
        return None
    return text.encode("ascii")


def _member_header(entry: LocalEntry) -> bytes:
    """The header blocks of one member: a pax record with the nanosecond mtime
    (left out when the mtime is whole seconds), then the ustar header.  Names
    too long or not ASCII go through :mod:`tarfile` (pax ``path``/``linkpath``)."""
    seconds, nanoseconds = divmod(entry.mtime_ns, 1_000_000_000)
    is_link = entry.kind == "link"
    name = _fast_name(entry.path)
    linkname = _fast_name(entry.link_target or "") if is_link else b""
    if name is None or linkname is None or entry.size > _USTAR_SIZE_MAX:
        return _tarfile_header(entry, seconds, nanoseconds)
    if is_link:
        header = _ustar_header(name, 0o777, 0, seconds, b"2", linkname)
    else:
        header = _ustar_header(name, entry.mode, entry.size, seconds, b"0", b"")
    if nanoseconds:
        return _pax_mtime_header(seconds, nanoseconds) + header
    return header


def _tarfile_header(entry: LocalEntry, seconds: int, nanoseconds: int) -> bytes:
    import tarfile

    member = tarfile.TarInfo(entry.path)
    member.mtime = seconds
    member.pax_headers = {"mtime": f"{seconds}.{nanoseconds:09d}"}
    if entry.kind == "link":
        member.type = tarfile.SYMTYPE
        member.linkname = entry.link_target or ""
        member.mode = 0o777
    else:
        member.mode = entry.mode
        member.size = entry.size
    return member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def stream_tar(source: Path, entries: Sequence[LocalEntry], sink: Any, progress: Progress | None) -> str | None:
    """Write one POSIX (pax) tar stream of ``entries`` into ``sink`` (a
    :class:`~gpuflow.sync.compress.GzipWriter` when it travels compressed).

    Written here rather than by the local ``tar``: the same bytes on Linux and
    macOS (whose bsdtar lacks GNU options), no name ever passes through an
    argument list, and each member carries the exact nanosecond mtime the plan
    compared (a pax ``mtime`` record) and the mode, so the next sync sees the
    file as unchanged.  Headers are built here for short ASCII names (what
    :mod:`tarfile` would write, at a fraction of its cost: it was most of a
    first sync's time per small file), by :meth:`tarfile.TarInfo.tobuf` for
    the rest; a small file travels as one write (header, bytes, padding), a
    big one through one reused buffer.
    Links are archived as links; owners are left out (the receiver runs ``tar
    --no-same-owner``).  Returns what went wrong reading a file (it changed or
    vanished; the archive is then left unterminated so the receiver fails
    rather than keep a short file), else None.
    """
    buffer = bytearray(COPY_CHUNK)
    view = memoryview(buffer)
    total = 0
    base = os.fspath(source) + os.sep
    advance = progress.advance if progress is not None else None

    def emit(data: bytes | memoryview) -> None:
        nonlocal total
        sink.write(data)  # BrokenPipeError propagates: the receiver's exit status explains it
        total += len(data)
        if advance is not None:
            advance(len(data))

    for entry in entries:
        if entry.kind == "link":
            emit(_member_header(entry))
            continue
        size = entry.size
        try:
            handle = open(base + entry.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            return f"{entry.path!r}: {exc.strerror or exc}"
        with handle:
            header = _member_header(entry)
            if size <= COPY_CHUNK:
                count = handle.readinto(view[:size]) if size else 0
                while count < size:  # a short read that is not the end of the file
                    more = handle.readinto(view[count:size])
                    if not more:
                        return f"{entry.path!r}: it shrank while being sent"
                    count += more
                emit(header + view[:size].tobytes() + bytes(-size % _TAR_BLOCK))
                continue
            emit(header)
            remaining = size
            while remaining:
                count = handle.readinto(view[: min(remaining, COPY_CHUNK)])
                if not count:
                    return f"{entry.path!r}: it shrank while being sent"
                emit(view[:count])
                remaining -= count
        emit(bytes(-size % _TAR_BLOCK))
    emit(bytes(2 * _TAR_BLOCK))  # end of archive
    emit(bytes(-total % _TAR_RECORD))
    return None


def local_rsync_usable() -> bool:
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
