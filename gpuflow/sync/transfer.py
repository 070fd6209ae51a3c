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


def stream_tar(source: Path, entries: Sequence[LocalEntry], sink: Any, progress: Progress | None) -> str | None:
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

    buffer = bytearray(COPY_CHUNK)
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
                count = handle.readinto(view[: min(remaining, COPY_CHUNK)])
                if not count:
                    return f"{entry.path!r}: it shrank while being sent"
                emit(view[:count])
                remaining -= count
        emit(bytes(-entry.size % _TAR_BLOCK))
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
