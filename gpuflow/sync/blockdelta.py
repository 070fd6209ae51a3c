"""Block delta: rewrite a large file the destination already holds by sending only its changed blocks.

rsync's delta transfer is sequential: its receiver reads the old file to
checksum it, then the sender reads the new one with a rolling checksum, then
the receiver writes the new file.  Here the ends work at once, and the old
file is read only when nothing vouches for its blocks:

1. one remote helper (:data:`DELTA_PY`, the target's ``/usr/bin/python3`` or
   ``python3``, ``-I -S``, standard library only; started over the sync's
   connection while the listing session holds the destination's lock; one for
   all the files) answers each file's list of block sha256s (``block_size``,
   256 KiB) while this side hashes the source's blocks (threads, see
   :func:`_block_hashes`).  Where it placed that file itself, it kept the list
   (``<dir>.gpuflow-blocks/``, beside the destination like its sync lock,
   keyed by the path's sha256) with the file's inode, size, mtime and ctime:
   while all four stand (any write or ``utime`` moves the ctime, which no one
   but root can set back) the list answers and the old file is not read.
   Otherwise it reads the old file, hashes each block and writes the same
   bytes into a new temporary file beside it (``.gpuflow-delta-<random>``,
   created exclusively; every path component opened without following links):
   the copy is exactly what was hashed;
2. the block lists are compared.  Where at most ``max_changed_fraction`` of
   the blocks both versions cover differ, only the differing blocks (and the
   new tail, and the new size) are sent.  For a listed file the helper now
   copies the old file into the temporary one in the kernel
   (``copy_file_range``: a reflink where the file system has them; read and
   write where it is missing) and refuses it if the old file's identity moved
   meanwhile; it writes the sent blocks over the copy (their sha256 checked as
   they arrive), truncates it to the new size, checks the sha256 of the whole
   block list it now holds against the source's, sets the source's mode and
   mtime, renames it over the old file (the old file stays whole until that
   rename; nothing is fsynced, as a tar or rsync placement) and records its
   list.  Where more blocks differ (an insertion shifts every later block) the
   file is left to the caller: rsync's rolling delta finds shifted blocks, or
   the file is sent whole;
3. a source file that changes while it is read (its size or mtime no longer
   the scan's, or a block re-read for sending no longer the hashed one) ends
   the sync as a tar stream's does (:class:`~gpuflow.errors.DataError`, "sync
   again"); the helper then removes its temporary files.

The protocol, on the helper's stdin: ``block_size`` (8 bytes, big-endian), the
file count (8), and per file its path's length (4) and the path; then per
file it did not refuse, ``S`` (skip: it drops its copy) or ``P`` + new size (8)
+ mode (4) + mtime in ns (8, signed) + the sha256 of the source's block list
(32) + the number of blocks sent (8), each as its index (8) + its bytes.  On
its stdout, after a ``GPUFLOW-DELTA/1`` line: per file ``H`` + the old size (8)
+ the block count (8) + each block's sha256, or ``E`` + length (2) + a reason;
then per decision ``K`` (placed) or ``E`` + reason.  The helper is started
through ``sh -c`` with the script as a positional parameter, quoted once by
:func:`~gpuflow.transport.base.quote_argv`; without a Python there it says
so and every file is left to the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gpuflow.errors import DataError, RemoteCommandFailed
from gpuflow.sync.ignore import LocalEntry
from gpuflow.sync.plan import DestinationState, SyncPlan
from gpuflow.sync.progress import Progress
from gpuflow.sync.session import SshSession, ssh_failure, tail
from gpuflow.transport.base import quote_argv

BLOCK_SIZE = 256 << 10
# Threads hashing one source file (contiguous runs of blocks each).
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
# A planned file goes by block delta when the destination holds a file of at least this size at its path.
MIN_BASIS_BYTES = 4 << 20
# More differing blocks than this (of those both versions cover) is a shift, not an edit.
MAX_CHANGED_FRACTION = 0.5

_READY = b"GPUFLOW-DELTA/1\n"
_NO_PYTHON = b"GPUFLOW-DELTA-NO-PYTHON\n"
_DIGEST = 32

DELTA_PY = r"""
import hashlib, os, stat, struct, sys, threading
inp = open(sys.stdin.fileno(), "rb", buffering=1 << 20, closefd=False)
out = open(sys.stdout.fileno(), "wb", buffering=1 << 16, closefd=False)
def exact(count):
    data = inp.read(count)
    if len(data) != count:
        raise EOFError("the sync ended early")
    return data
def refuse(reason):
    data = str(reason).encode("utf-8", "replace")[:500]
    out.write(b"E" + struct.pack(">H", len(data)) + data)
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
root_fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
try:  # the block lists of the files this helper placed, beside the destination (as its sync lock)
    cache = sys.argv[1].rstrip("/") + ".gpuflow-blocks"
    if not os.path.isdir(cache):
        os.mkdir(cache, 0o700)
    cache_fd = os.open(cache, DIRECTORY)
except OSError:
    cache_fd = None
HEAD = struct.Struct(">5sQQQQqq")
def identity(status):
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
def key(name):
    return hashlib.sha256(name).hexdigest()
def cached(name, status):
    # The block list recorded when this helper placed the file: still its own while the
    # inode, size, mtime and ctime (which any write or utime moves) are the same.
    if cache_fd is None:
        return None
    try:
        with open(os.open(key(name), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=cache_fd), "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    if len(data) < HEAD.size:
        return None
    magic, size_of_block, *rest = HEAD.unpack_from(data)
    body = data[HEAD.size:]
    if magic != b"GFBD1" or size_of_block != block_size or tuple(rest) != identity(status):
        return None
    if len(body) != 32 * -(-status.st_size // block_size):
        return None
    return [body[i : i + 32] for i in range(0, len(body), 32)]
def remember(name, status, digests):
    if cache_fd is None:
        return
    temp = key(name) + "." + os.urandom(6).hex()
    try:
        with open(os.open(temp, NEW, 0o600, dir_fd=cache_fd), "wb") as handle:
            handle.write(HEAD.pack(b"GFBD1", block_size, *identity(status)) + b"".join(digests))
        os.rename(temp, key(name), src_dir_fd=cache_fd, dst_dir_fd=cache_fd)
    except OSError:
        try:
            os.unlink(temp, dir_fd=cache_fd)
        except OSError:
            pass
def parent_of(name):
    parts = name.split(b"/")
    if any(part in (b"", b".", b"..") for part in parts):
        raise OSError("not a plain relative path")
    directory = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            opened = os.open(part, DIRECTORY, dir_fd=directory)
            os.close(directory)
            directory = opened
    except BaseException:
        os.close(directory)
        raise
    return directory, parts[-1]
def make_temp(parent):
    for _ in range(100):
        temp = b".gpuflow-delta-" + os.urandom(6).hex().encode()
        try:
            return temp, os.open(temp, NEW, 0o600, dir_fd=parent)
        except FileExistsError:
            continue
    raise OSError("cannot create a temporary file")
def copy(source, target, count):
    # In the kernel where it can (a reflink on XFS/btrfs), else by reads and writes.
    done = 0
    try:
        while done < count:
            moved = os.copy_file_range(source, target, count - done, done, done)
            if not moved:
                break
            done += moved
    except (AttributeError, OSError):
        pass
    while done < count:
        data = os.pread(source, min(1 << 20, count - done), done)
        if not data:
            break
        os.pwrite(target, data, done)
        done += len(data)
class Copying(threading.Thread):
    def __init__(self, *args):
        threading.Thread.__init__(self, daemon=True)
        self.args, self.failure = args, None
        self.start()
    def run(self):
        try:
            copy(*self.args)
        except BaseException as exc:
            self.failure = exc
    def finish(self):
        self.join()
        if self.failure is not None:
            raise self.failure
def drop(entry):
    if entry[7] is not None:
        entry[7].join()
    parent, temp, fd, basis = entry[0], entry[1], entry[2], entry[5]
    for descriptor in (fd, basis):
        if descriptor is not None:
            os.close(descriptor)
    if temp is not None:
        try:
            os.unlink(temp, dir_fd=parent)
        except OSError:
            pass
    os.close(parent)
out.write(b"GPUFLOW-DELTA/1\n")
out.flush()
block_size, count = struct.unpack(">QQ", exact(16))
names = [exact(struct.unpack(">I", exact(4))[0]) for _ in range(count)]
held = []  # per file: [parent fd, temp name, temp fd, digests, name, basis fd, listed basis status, copying thread]
try:
    for name in names:
        try:
            parent, leaf = parent_of(name)
        except OSError as exc:
            refuse(exc.strerror or exc)
            continue
        try:
            basis = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
        except OSError as exc:
            os.close(parent)
            refuse(exc.strerror or exc)
            continue
        status = os.fstat(basis)
        if not stat.S_ISREG(status.st_mode):
            os.close(basis)
            os.close(parent)
            refuse("not a regular file")
            continue
        digests = cached(name, status)
        if digests is not None:
            entry = [parent, None, None, digests, name, basis, status, None]
            held.append(entry)
            out.write(b"H" + struct.pack(">QQ", status.st_size, len(digests)) + b"".join(digests))
            out.flush()
            try:  # copy it while the other side hashes: most of it will stay
                entry[1], entry[2] = make_temp(parent)
                entry[7] = Copying(basis, entry[2], status.st_size)
            except (OSError, RuntimeError):
                pass  # copied in phase 2
            continue
        entry = [parent, None, None, [], name, basis, None, None]
        held.append(entry)
        try:
            entry[1], entry[2] = make_temp(parent)
        except OSError as exc:
            held.pop()
            drop(entry)
            refuse(exc.strerror or exc)
            continue
        # Hash the basis and write the same bytes into the new file (the copy is what was hashed),
        # contiguous runs of blocks in threads (reads, writes and sha256 release the GIL).
        fd, size = entry[2], status.st_size
        digests = entry[3] = [b""] * -(-size // block_size)
        def run(first, last, fd=fd, digests=digests, basis=basis, size=size):
            for index in range(first, last):
                offset = index * block_size
                want = min(block_size, size - offset)
                data = os.pread(basis, want, offset)
                while 0 < len(data) < want:  # a short read that is not the end of the file
                    more = os.pread(basis, want - len(data), offset + len(data))
                    if not more:
                        break
                    data += more
                digests[index] = hashlib.sha256(data).digest()
                view, done = memoryview(data), 0
                while done < len(data):
                    done += os.pwrite(fd, view[done:], offset + done)
        workers = max(1, min(4, os.cpu_count() or 1, len(digests)))
        span = -(-len(digests) // workers)
        failures = []
        def guarded(first, run=run, failures=failures, span=span, count=len(digests)):
            try:
                run(first, min(count, first + span))
            except BaseException as exc:
                failures.append(exc)
        threads = [threading.Thread(target=guarded, args=(first,)) for first in range(0, len(digests), span)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        os.close(basis)
        entry[5] = None
        out.write(b"H" + struct.pack(">QQ", size, len(digests)) + b"".join(digests))
    out.flush()
    for position, entry in enumerate(list(held)):
        decision = exact(1)
        if decision == b"S":
            held[position] = None
            drop(entry)
            continue
        new_size, mode, mtime_ns = struct.unpack(">QIq", exact(20))
        expected = exact(32)
        (sent,) = struct.unpack(">Q", exact(8))
        parent, name, digests = entry[0], entry[4], entry[3]
        failure = None
        if entry[6] is not None:  # a listed file: copied now (or by its thread), then checked
            try:
                if entry[7] is not None:
                    entry[7].finish()
                else:
                    if entry[2] is None:
                        entry[1], entry[2] = make_temp(parent)
                    copy(entry[5], entry[2], min(new_size, entry[6].st_size))
                if identity(os.fstat(entry[5])) != identity(entry[6]):
                    failure = "the destination copy changed during the sync"
            except OSError as exc:
                failure = exc.strerror or exc
        fd = entry[2]
        blocks = -(-new_size // block_size)
        final = digests[:blocks] + [b""] * (blocks - len(digests))
        for _ in range(sent):
            (index,) = struct.unpack(">Q", exact(8))
            length = min(block_size, new_size - index * block_size)
            data = exact(length)
            final[index] = hashlib.sha256(data).digest()
            if failure is None:
                os.pwrite(fd, data, index * block_size)
        held[position] = None
        if failure is None and hashlib.sha256(b"".join(final)).digest() != expected:
            failure = "the new file did not verify"
        if failure is None:
            try:
                os.ftruncate(fd, new_size)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
                os.rename(entry[1], name.split(b"/")[-1], src_dir_fd=parent, dst_dir_fd=parent)
                entry[1] = None
                remember(name, os.fstat(fd), final)
            except OSError as exc:
                failure = exc.strerror or exc
        drop(entry)
        if failure is None:
            out.write(b"K")
        else:
            refuse(failure)
        out.flush()
finally:
    for entry in held:
        if entry is not None:
            drop(entry)
out.flush()
"""

# The script runs as `PYTHON -I -S -c SCRIPT DIR`: the system's /usr/bin/python3 first (it starts in
# tens of ms, where a version manager's `python3` shim on PATH can take half a second), else
# `python3` on PATH; without either the helper says so (exit 0) and the caller sends the files as before.
_LAUNCH = (
    "for p in /usr/bin/python3 python3; do "
    'command -v "$p" >/dev/null 2>&1 && exec "$p" -I -S -c "$0" "$@"; '
    "done; printf 'GPUFLOW-DELTA-NO-PYTHON\\n'; exit 0"
)


@dataclass(frozen=True)
class DeltaOutcome:
    """What one block-delta session did."""

    placed: tuple[str, ...]  # files rewritten from their changed blocks
    fallback: tuple[LocalEntry, ...]  # files left to the caller: shifted content, refused there, no python3 there
    block_bytes: int  # bytes of block data sent
    wire_bytes: int  # everything written to the helper (requests, headers, blocks)


def candidates(plan: SyncPlan, state: DestinationState, min_bytes: int | None = None) -> tuple[LocalEntry, ...]:
    """The planned files the destination already holds a file of ``min_bytes`` (:data:`MIN_BASIS_BYTES`) or more at."""
    min_bytes = MIN_BASIS_BYTES if min_bytes is None else min_bytes
    chosen = []
    for entry in plan.to_send:
        existing = state.entries.get(entry.path)
        if entry.kind == "file" and existing is not None and existing.kind == "file" and existing.size >= min_bytes:
            chosen.append(entry)
    return tuple(chosen)


def _changed(path: str) -> DataError:
    return DataError(
        f"reading the files to send failed: {path!r}: it changed while being sent",
        hint="a file changed or vanished; sync again",
    )


def _block_hashes(path: str, entry: LocalEntry, block_size: int) -> list[bytes]:
    """The sha256 of each block of the source file, checked against the scan (size, mtime);
    contiguous runs of blocks hashed by up to :data:`HASH_THREADS` threads (reads and sha256
    of a large buffer release the GIL)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise DataError(
            f"reading the files to send failed: {entry.path!r}: {exc.strerror or exc}",
            hint="a file changed or vanished; sync again",
        ) from None
    try:
        status = os.fstat(descriptor)
        if status.st_size != entry.size or status.st_mtime_ns != entry.mtime_ns:
            raise _changed(entry.path)
        count = -(-entry.size // block_size)
        digests = [b""] * count

        def hash_run(first: int, last: int) -> None:
            for index in range(first, last):
                offset = index * block_size
                length = min(block_size, entry.size - offset)
                data = os.pread(descriptor, length, offset)  # os.preadv is missing on some macOS builds
                while len(data) < length:
                    more = os.pread(descriptor, length - len(data), offset + len(data))
                    if not more:
                        raise _changed(entry.path)
                    data += more
                digests[index] = hashlib.sha256(data).digest()

        workers = max(1, min(HASH_THREADS, count))
        if workers == 1:
            hash_run(0, count)
        else:
            run = -(-count // workers)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(hash_run, start, min(count, start + run)) for start in range(0, count, run)]:
                    future.result()
    finally:
        os.close(descriptor)
    return digests


def _read_block(handle: IO[bytes], offset: int, length: int) -> bytes:
    """One block of the source, read again for sending."""
    return os.pread(handle.fileno(), length, offset)


class _Reader:
    """Exact reads from the helper's stdout."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def exact(self, count: int) -> bytes:
        data = self.stream.read(count)
        if data is None or len(data) != count:
            raise EOFError
        return data

    def refusal(self) -> str:
        (length,) = struct.unpack(">H", self.exact(2))
        return self.exact(length).decode("utf-8", "replace")


def send_block_deltas(
    session: SshSession,
    source: Path,
    directory: str,
    entries: Sequence[LocalEntry],
    *,
    block_size: int | None = None,
    max_changed_fraction: float | None = None,
    progress: Progress | None = None,
) -> DeltaOutcome:
    """Rewrite ``entries`` in ``directory`` on the session's target from their
    changed blocks (see the module's docstring); the files it leaves to the
    caller are in :attr:`DeltaOutcome.fallback`.  Raises
    :class:`~gpuflow.errors.DataError` when a source file changes meanwhile, and
    :class:`~gpuflow.errors.RemoteCommandFailed` when the destination cannot be
    written; either way the old files stay as they were."""
    block_size = block_size or BLOCK_SIZE
    fraction = MAX_CHANGED_FRACTION if max_changed_fraction is None else max_changed_fraction
    if not entries:
        return DeltaOutcome((), (), 0, 0)
    base = os.fspath(source) + os.sep
    errors = tempfile.TemporaryFile()
    command = quote_argv(["sh", "-c", _LAUNCH, DELTA_PY, directory])
    process = subprocess.Popen(
        [*session.base_argv, session.target.host, command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        bufsize=1 << 20,
    )
    assert process.stdin is not None and process.stdout is not None
    stdin, reader = process.stdin, _Reader(process.stdout)
    hashing = ThreadPoolExecutor(max_workers=1)
    finished = False

    def failure(what: str) -> Exception:
        code = process.wait()
        errors.seek(0)
        stderr = errors.read()
        if code == 255:
            return ssh_failure(session.target, stderr, "sync")
        return RemoteCommandFailed(
            f"{what} on {session.target.host} failed (exit {code}): {tail(stderr) or 'no message'}"
        )

    try:
        # Hash here while the helper starts and hashes there.
        local: list[Future[list[bytes]]] = [
            hashing.submit(_block_hashes, base + entry.path, entry, block_size) for entry in entries
        ]
        written = 0

        def send(data: bytes | memoryview) -> None:
            nonlocal written
            stdin.write(data)
            written += len(data)

        try:
            header = [struct.pack(">QQ", block_size, len(entries))]
            for entry in entries:
                name = os.fsencode(entry.path)
                header.append(struct.pack(">I", len(name)) + name)
            send(b"".join(header))
            stdin.flush()
        except BrokenPipeError:
            pass  # the helper's first line or exit status says why
        prelude = b""
        while not prelude.endswith(_READY):
            byte = process.stdout.read(1)
            if not byte:
                if prelude.endswith(_NO_PYTHON):
                    for future in local:
                        future.cancel()
                    return DeltaOutcome((), tuple(entries), 0, 0)
                raise failure("the block delta")
            prelude = (prelude + byte)[-4096:]
        remote: list[tuple[int, list[bytes]] | None] = []
        try:
            for _ in entries:
                kind = reader.exact(1)
                if kind == b"E":
                    reader.refusal()
                    remote.append(None)
                    continue
                if kind != b"H":
                    raise EOFError
                old_size, count = struct.unpack(">QQ", reader.exact(16))
                data = reader.exact(count * _DIGEST)
                remote.append((old_size, [data[i : i + _DIGEST] for i in range(0, len(data), _DIGEST)]))
        except EOFError:
            raise failure("the block delta") from None

        placed: list[LocalEntry] = []
        fallback: list[LocalEntry] = []
        block_bytes = 0
        try:
            for entry, theirs, future in zip(entries, remote, local):
                mine = future.result()
                if theirs is None:
                    fallback.append(entry)
                    continue
                old = theirs[1]
                overlap = min(len(old), len(mine))
                changed = [index for index in range(len(mine)) if index >= len(old) or old[index] != mine[index]]
                shifted = sum(1 for index in changed if index < overlap)
                if overlap and shifted > fraction * overlap:
                    send(b"S")
                    fallback.append(entry)
                    continue
                send(
                    b"P"
                    + struct.pack(">QIq", entry.size, entry.mode, entry.mtime_ns)
                    + hashlib.sha256(b"".join(mine)).digest()
                    + struct.pack(">Q", len(changed))
                )
                with open(base + entry.path, "rb", buffering=0) as handle:
                    for index in changed:
                        length = min(block_size, entry.size - index * block_size)
                        data = _read_block(handle, index * block_size, length)
                        if len(data) != length or hashlib.sha256(data).digest() != mine[index]:
                            raise _changed(entry.path)
                        send(struct.pack(">Q", index))
                        send(data)
                        block_bytes += length
                    status = os.fstat(handle.fileno())
                    if status.st_size != entry.size or status.st_mtime_ns != entry.mtime_ns:
                        raise _changed(entry.path)
                placed.append(entry)
            stdin.close()
        except BrokenPipeError:
            raise failure("the block delta") from None
        try:
            for entry in placed:
                kind = reader.exact(1)
                if kind == b"E":
                    reason = reader.refusal()
                    raise RemoteCommandFailed(
                        f"writing {entry.path!r} on {session.target.host} failed: {reason}",
                        hint="sync again",
                    )
                if kind != b"K":
                    raise EOFError
                if progress is not None:
                    progress.advance(entry.size)
        except EOFError:
            raise failure("the block delta") from None
        code = process.wait()
        finished = True
        if code != 0:
            raise failure("the block delta")
        return DeltaOutcome(tuple(entry.path for entry in placed), tuple(fallback), block_bytes, written)
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
        if not finished:
            # Closing its stdin mid-protocol makes the helper drop its temporary files and exit.
            with contextlib.suppress(OSError, ValueError):
                stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        errors.close()


__all__ = [
    "BLOCK_SIZE",
    "DELTA_PY",
    "MAX_CHANGED_FRACTION",
    "MIN_BASIS_BYTES",
    "DeltaOutcome",
    "candidates",
    "send_block_deltas",
]
