"""The sync's remote session: one shell script that probes, lists, locks, deletes and unpacks.

The exchange, one remote shell session per sync (:data:`EXCHANGE_SCRIPT`):

0. (unless dry-run) take the destination's sync lock on fd 9 -- inherited by
   tar / cat below, so it is held until the session ends -- printing
   ``GPUFLOW-SYNC-WAIT`` first if another sync holds it (exit 6 after the wait);
   without flock(1) or a writable lock path the sync goes on unlocked;
1. say whether rsync exists, whether the destination exists (creating it
   unless dry-run), and list it with ``find -printf`` (NUL-terminated fields:
   any file name survives), then an END record;
2. read one line from stdin, ``<bytes> <bytes> <next>``: that many bytes of
   NUL-separated paths to delete (relative, from the listing), removed
   without following links (a directory only when empty), then that many of
   directories to create (the tree's empty ones: nothing unpacked makes them);
3. ``<next>`` is ``tar``: unpack the rest of stdin here (``tgz``: gzip-compressed,
   see :mod:`gpuflow.sync.compress`); ``wait``: stay until
   stdin closes (rsync is using the connection meanwhile); ``none``: done.

``read`` takes exactly one line and ``head -c`` exactly each ``<bytes>``, so the tar
stream that follows on the same stdin is untouched.  The script is a constant:
everything variable reaches it as a positional parameter, quoted once by
:func:`~gpuflow.transport.base.quote_argv`, and is named on its first line.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from gpuflow.errors import DataError, RemoteCommandFailed
from gpuflow.sync.compress import GzipWriter
from gpuflow.sync.ignore import LocalEntry, SourceTree
from gpuflow.sync.lock import LOCK_EXIT_CODE, SYNC_LOCK_SUFFIX, SYNC_LOCK_WAIT_SECONDS, lock_timeout
from gpuflow.sync.plan import DestinationEntry, DestinationState, needs_sending
from gpuflow.sync.progress import Progress
from gpuflow.sync.session import SshSession, ssh_failure, tail
from gpuflow.sync.transfer import stream_tar
from gpuflow.transport.base import TAKE_LOCK_SHELL_FUNCTION, quote_argv

# Searched for, not matched at the start: a login shell may print a banner first.
_PROBE_HEADER = re.compile(rb"(?:^|\n)GPUFLOW-PROBE rsync=(\d) exists=(\d) listed=(\d) gzip=(\d)\n")
_LISTING_END = b"END" + b"\0" * 6  # a 6-field record no find output can produce (kinds are one letter)
_SYNC_WAIT_LINE = b"GPUFLOW-SYNC-WAIT\n"
STDIN_BUFFER = 1 << 18

# Positional parameters: the destination directory, 1 to create and lock it (0:
# a dry run, which changes nothing and so need not wait), the lock file's suffix,
# the seconds to wait for the lock, the exit status when that wait runs out.
EXCHANGE_SCRIPT = TAKE_LOCK_SHELL_FUNCTION + r"""d=$1 create=$2 lock_suffix=$3 lock_wait=$4 lock_code=$5
r=0 e=0 l=0 z=0
command -v rsync >/dev/null 2>&1 && r=1
command -v gzip >/dev/null 2>&1 && z=1
if [ "$create" = 1 ]; then
  mkdir -p -- "$d" || exit 3
  k="${d%/}$lock_suffix"
  if command -v flock >/dev/null 2>&1 && touch -- "$k" 2>/dev/null; then
    take_lock "$k" "$lock_wait" GPUFLOW-SYNC-WAIT || exit "$lock_code"
  fi
fi
if [ -d "$d" ] && cd -- "$d"; then
  e=1
  find . -maxdepth 0 -printf '' >/dev/null 2>&1 && l=1
fi
printf 'GPUFLOW-PROBE rsync=%s exists=%s listed=%s gzip=%s\n' "$r" "$e" "$l" "$z"
if [ "$l" = 1 ]; then find . -mindepth 1 -printf '%y\0%m\0%s\0%T@\0%l\0%P\0' || exit 5; fi
printf 'END\0\0\0\0\0\0'
IFS=' ' read -r n m next || exit 0
if [ "$n" -gt 0 ]; then
  [ "$e" = 1 ] || exit 3
  head -c "$n" | xargs -0 -r sh -c '
    for p in "$@"; do
      if [ -d "$p" ] && [ ! -L "$p" ]; then rmdir -- "$p" 2>/dev/null || true; else rm -f -- "$p"; fi
    done' sh || exit 4
fi
if [ "$m" -gt 0 ]; then
  [ "$e" = 1 ] || exit 3
  head -c "$m" | xargs -0 -r mkdir -p -- || exit 4
fi
if [ "$next" = tar ] || [ "$next" = tgz ]; then
  [ "$e" = 1 ] || exit 3
  z=; [ "$next" = tgz ] && z=-z
  exec env LC_ALL=C tar --no-same-owner $z -xpf - --warning=no-timestamp --warning=no-unknown-keyword
fi
if [ "$next" = wait ]; then exec cat >/dev/null; fi
"""


_FIND_KINDS = {b"f": "file", b"l": "link", b"d": "dir"}


# One whole record of the listing: six NUL-terminated fields (regex-split at C speed).
_LISTING_RECORD = re.compile(rb"(?:[^\0]*\0){6}")
_BILLION = 1_000_000_000
_EXPECT_FROM_RECORDS = 256  # fewer listed records are each compared field by field
_NOTHING_EXPECTED: dict[bytes, int] = {}


def expected_records(tree: SourceTree) -> dict[bytes, int]:
    """The record ``find -printf`` prints for each file of ``tree`` held as it
    is here (kind, mode, size, ``%T@`` mtime, no link target, path) -> the
    file's position in ``tree.entries``: a listed record found here is an
    unchanged file, with one dict lookup and no parsing.  (A file with an mtime
    before 2001, or one find prints otherwise, is simply not found here: the
    slow path compares it.)"""
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's
    octal: dict[int, str] = {}
    expected: dict[bytes, int] = {}
    for position, (path, kind, size, mtime_ns, mode, _) in enumerate(tree.entries):
        if kind != "file" or mtime_ns < 10**18:  # 19 digits: the last 9 are the fraction
            continue
        mode_text = octal.get(mode)
        if mode_text is None:
            mode_text = octal[mode] = f"{mode:o}"
        digits = str(mtime_ns)
        expected[f"f\0{mode_text}\0{size}\0{digits[:-9]}.{digits[-9:]}0\0\0{path}\0".encode(encoding, errors)] = position
    return expected


class ListingParser:
    """Parses the ``find -printf '%y\\0%m\\0%s\\0%T@\\0%l\\0%P\\0'`` listing
    as it arrives (:meth:`feed` each chunk, then :meth:`close`).

    Against a scanned tree (``tree``), a record that is byte for byte what find
    prints for a file the tree holds as it is (:func:`expected_records`) only
    sets that file's byte in :attr:`unchanged`: the records are cut apart by
    one regex and looked up in one dict, so an unchanged file costs no Python
    parsing.  Every other record (a directory, a link, a changed or extra file,
    an mtime the destination keeps to the second) is parsed and compared field
    by field."""

    def __init__(self, tree: SourceTree | None = None) -> None:
        self.entries: dict[str, DestinationEntry] = {}
        self._rest = b""
        self._tree = tree
        # Built once the listing shows more than a few records (a first sync's listing is empty).
        self._expected: dict[bytes, int] | None = None
        self._listed = 0
        self.unchanged = bytearray(len(tree.entries)) if tree is not None else None

    def feed(self, data: bytes) -> None:
        buffer = self._rest + data if self._rest else data
        # The buffer starts at a record: its last (count % 6) NULs end the fields of a
        # cut-off record, so the whole records end at the NUL before those.
        end = len(buffer)
        for _ in range(buffer.count(b"\0") % 6 + 1):
            end = buffer.rfind(b"\0", 0, end)
        end += 1
        records = _LISTING_RECORD.findall(buffer, 0, end)  # back to back from the start
        self._rest = buffer[end:]
        self._listed += len(records)
        if self._expected is None and self._tree is not None and self._listed > _EXPECT_FROM_RECORDS:
            self._expected = expected_records(self._tree)
        find_expected = (self._expected or _NOTHING_EXPECTED).get
        unchanged = self.unchanged
        for record in records:
            position = find_expected(record)
            if position is not None:
                unchanged[position] = 1  # type: ignore[index]  # expected records exist only with a tree
                continue
            self._parse_record(record)

    def close(self) -> dict[str, DestinationEntry]:
        if self._rest:
            raise RemoteCommandFailed("the destination listing was cut short; run the sync again")
        return self.entries

    def _parse_record(self, record: bytes) -> None:
        kind_code, mode, size, mtime, link_target, path, _ = record.split(b"\0")
        kind = _FIND_KINDS.get(kind_code, "other")
        seconds, _, fraction = mtime.partition(b".")
        mtime_ns = int(seconds) * _BILLION + int((fraction + b"000000000")[:9] or 0)
        if kind == "file":
            entry = DestinationEntry("file", int(size), mtime_ns, int(mode, 8))
        elif kind == "link":
            entry = DestinationEntry("link", 0, mtime_ns, 0, os.fsdecode(link_target))
        else:
            entry = DestinationEntry(kind, 0, mtime_ns)
        name = os.fsdecode(path)
        tree = self._tree
        if tree is not None and self.unchanged is not None and kind != "dir":
            position = tree.position(name)
            if position is not None and not needs_sending(tree.entries[position], entry):
                self.unchanged[position] = 1
                return
        self.entries[name] = entry


def parse_find_listing(data: bytes) -> dict[str, DestinationEntry]:
    """Parse a whole ``find -printf '%y\\0%m\\0%s\\0%T@\\0%l\\0%P\\0'`` listing."""
    parser = ListingParser()
    parser.feed(data)
    return parser.close()


class Exchange:
    """The sync's first (and, for tar or no change, only) remote session:
    probe and list the destination, then delete and unpack on the same stdin.

    stderr goes to a temp file, never a pipe, so a chatty remote cannot fill a
    pipe while this process is busy writing the tar stream.
    """

    def __init__(
        self, session: SshSession, directory: str, *, create: bool, lock_wait: float = SYNC_LOCK_WAIT_SECONDS
    ) -> None:
        self.session = session
        self.directory = directory
        self.lock_wait = lock_wait
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            session.master_argv(
                quote_argv(["sh", "-c", EXCHANGE_SCRIPT, "gpuflow-sync", directory, "1" if create else "0",
                            SYNC_LOCK_SUFFIX, f"{lock_wait:g}", str(LOCK_EXIT_CODE)])
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=STDIN_BUFFER,  # small members coalesce into big writes: fewer wake-ups along ssh, sshd and tar
        )
        self._finished = False
        self._what = "sync"
        self._packer_failure: str | None = None
        # The listing is read from the start, in a thread, while the caller scans the
        # local tree: the remote find never waits for a full pipe (see _prefetch).
        self._chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._prefetch, name="gpuflow-sync-listing", daemon=True)
        self._reader.start()

    def _prefetch(self) -> None:
        """Read stdout until the END record (what :meth:`read_state` consumes, and
        where it stops) or end-of-file (then an empty chunk)."""
        assert self.process.stdout is not None
        tail = b""
        try:
            while True:
                chunk = self.process.stdout.read1(1 << 16)
                self._chunks.put(chunk)
                if not chunk:
                    return
                tail = (tail + chunk)[-len(_LISTING_END) :]
                if tail == _LISTING_END:
                    return
        except (OSError, ValueError):
            self._chunks.put(b"")

    def _failure(self, code: int, what: str) -> Exception:
        self._stderr.seek(0)
        stderr = self._stderr.read()
        if code == 255:
            return ssh_failure(self.session.target, stderr, what)
        return RemoteCommandFailed(f"{what} failed on {self.session.target.host} (exit {code}): {tail(stderr)}")

    def read_state(
        self, waiting: Callable[[str], None] = lambda message: None, tree: SourceTree | None = None
    ) -> DestinationState:
        """Read the probe header and the listing (until the END record).

        ``waiting`` hears once when another sync holds the destination's lock.
        With ``tree`` (the scanned source) the listing is compared as it
        streams in: what the destination holds as the tree does is only marked
        (:attr:`DestinationState.unchanged`), not kept.
        """
        assert self.process.stdout is not None
        chunks: list[bytes] = []  # what came before the probe header (and the header)
        tail = b""
        told = False
        header = None
        parser = ListingParser(tree)
        withheld = b""  # the last bytes, held back from the parser: they may be the END record
        while True:
            chunk = self._chunks.get()
            if not chunk:
                code = self.process.wait()
                self._finished = True
                if code == LOCK_EXIT_CODE and told:
                    raise lock_timeout(f"{self.session.target.host}:{self.directory}", self.lock_wait)
                raise self._failure(code if code else 1, "listing the destination")
            tail = (tail + chunk)[-len(_LISTING_END) :]
            if header is None:
                if not told and _SYNC_WAIT_LINE in b"".join(chunks[-1:]) + chunk:
                    told = True
                    waiting(
                        f"another sync to {self.session.target.host}:{self.directory} is running; "
                        "waiting for it to finish"
                    )
                chunks.append(chunk)
                prelude = b"".join(chunks)
                header = _PROBE_HEADER.search(prelude)
                if header is None:
                    if tail == _LISTING_END:
                        break
                    continue
                chunk = prelude[header.end() :]
            if header.group(3) == b"1":
                withheld += chunk
                if len(withheld) > len(_LISTING_END):
                    parser.feed(withheld[: -len(_LISTING_END)])
                    withheld = withheld[-len(_LISTING_END) :]
            if tail == _LISTING_END:
                break
        if header is None:
            raise RemoteCommandFailed(f"unexpected answer from {self.session.target.host} to the sync probe")
        has_rsync, exists, listed, has_gzip = (value == b"1" for value in header.groups())
        entries = parser.close() if listed else {}
        unchanged = bytes(parser.unchanged) if listed and parser.unchanged is not None else None
        return DestinationState(
            exists=exists, entries=entries, listed=listed or not exists, has_rsync=has_rsync, has_gzip=has_gzip,
            unchanged=unchanged,
        )

    def finish(
        self,
        deletions: Sequence[str] = (),
        *,
        directories: Sequence[str] = (),
        tar_source: Path | None = None,
        tar_entries: Sequence[LocalEntry] = (),
        progress: Progress | None = None,
        keep_open: bool = False,
        compress: bool = False,
    ) -> None:
        """Send the deletions and the directories to create, then (with
        ``tar_source``) the tar stream of ``tar_entries`` (gzip-compressed with
        ``compress``), and wait for the remote side; with ``keep_open`` the session stays up (for rsync) until
        :meth:`end`."""
        assert self.process.stdin is not None
        doomed = b"".join(os.fsencode(path) + b"\0" for path in deletions)
        made = b"".join(os.fsencode(path) + b"\0" for path in directories)
        next_step = ("tgz" if compress else "tar") if tar_source is not None else "wait" if keep_open else "none"
        self._what = "unpacking" if tar_source is not None else "deleting removed files and creating directories"
        try:
            self.process.stdin.write(f"{len(doomed)} {len(made)} {next_step}\n".encode() + doomed + made)
            self.process.stdin.flush()
            if tar_source is not None:
                sink = GzipWriter(self.process.stdin) if compress else self.process.stdin
                self._packer_failure = stream_tar(tar_source, tar_entries, sink, progress)
                if compress and self._packer_failure is None:  # a failed stream stays cut off: the receiver fails
                    sink.close()
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
        self._reader.join(timeout=10)  # it ends at end-of-file at the latest: the process has ended
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()
