"""The local state cache: small JSON documents, written atomically, under a lock.

AWS tags are the source of truth for clusters; what lives here is a cache that
``status`` reconciles.  Two gpuflow processes may run at once (a ``run`` in one
terminal, a ``status`` in another), so every read-modify-write holds an
exclusive ``flock`` on the collection's lock file, and every write goes to a
temporary file that is fsynced and then renamed over the old one: a crash
leaves either the old document or the new one, never half of one.

Layout under the gpuflow home::

    state/<collection>/<name>.json
    state/<collection>/.lock
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpuflow.errors import DamagedRecord, UsageError

# One home for these helpers (infra uses them too, and imports nothing from gpuflow); re-exported here.
from infra.common import atomic_write_bytes, atomic_write_json, process_alive, validate_name

__all__ = ["StateStore", "atomic_write_bytes", "atomic_write_json", "process_alive", "validate_name", "warn_damaged"]


@contextlib.contextmanager
def locked(
    path: Path, *, timeout: float | None = None, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created when missing) between
    gpuflow processes: the one local lock helper.

    Waits for another holder without limit, or up to ``timeout`` seconds and
    then raises :class:`TimeoutError`; ``on_wait`` is called once when the lock
    is held elsewhere (to say that we wait).  The lock goes when the block ends,
    or with the process: a crashed holder never leaves it taken.
    """
    with open(path, "a+") as lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            if timeout is None:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise TimeoutError(f"{path} is still locked after {timeout:g} s") from None
                        time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


class StateStore:
    """One collection of JSON documents (e.g. ``clusters`` or ``runs``)."""

    def __init__(
        self,
        home: Path,
        collection: str,
        *,
        shape: Callable[[str, dict[str, Any]], None] | None = None,
        repair_hint: Callable[[str, Any], str] | None = None,
    ) -> None:
        """``shape(name, document)`` raises TypeError/ValueError/KeyError when a
        document is not a record of this collection (a record that does not
        parse into its dataclass is damaged); ``repair_hint(name, raw)`` says
        what to do about a damaged one."""
        self._shape = shape
        self._repair_hint = repair_hint
        self.damaged: tuple[DamagedRecord, ...] = ()  # the records the last scan()/all() found damaged
        self.directory = Path(home) / "state" / validate_name(collection, "collection")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_path = self.directory / ".lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the collection's exclusive lock (blocks other gpuflow processes)."""
        with locked(self._lock_path):
            yield

    def path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        """The record ``name`` (None when there is none); :class:`DamagedRecord`
        when it is not JSON or does not have the collection's shape."""
        path = self.path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._damaged(name, None, f"unreadable: {exc.strerror or exc}") from exc
        try:
            document = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._damaged(name, None, f"not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise self._damaged(name, document, f"a JSON {type(document).__name__}, not an object")
        if self._shape is not None:
            try:
                self._shape(name, document)
            except (TypeError, ValueError, KeyError, AttributeError, UsageError) as exc:
                raise self._damaged(name, document, str(exc) or type(exc).__name__) from exc
        return document

    def _damaged(self, name: str, raw: Any, reason: str) -> DamagedRecord:
        path = self.path(name)
        hint = self._repair_hint(name, raw) if self._repair_hint else f"move {path} away"
        return DamagedRecord(f"state record {path} is damaged ({reason})", path=path, name=name, raw=raw, hint=hint)

    def put(self, name: str, document: dict[str, Any]) -> None:
        atomic_write_json(self.path(name), document)

    def delete(self, name: str) -> bool:
        try:
            self.path(name).unlink()
            return True
        except FileNotFoundError:
            return False

    def names(self) -> list[str]:
        return sorted(path.stem for path in self.directory.glob("*.json"))

    def scan(self) -> tuple[dict[str, dict[str, Any]], tuple[DamagedRecord, ...]]:
        """Every record: the sound ones by name, and the damaged ones (not raised)."""
        documents: dict[str, dict[str, Any]] = {}
        damaged: list[DamagedRecord] = []
        for name in self.names():
            try:
                document = self.get(name)
            except DamagedRecord as exc:
                damaged.append(exc)
                continue
            except UsageError:  # a file name gpuflow never writes (hand-made): not a record
                continue
            if document is not None:
                documents[name] = document
        self.damaged = tuple(damaged)
        return documents, self.damaged

    def all(self) -> dict[str, dict[str, Any]]:
        """The sound records by name.  A damaged one concerns its own name only:
        it is skipped, with a one-line warning on stderr naming its path (once
        per process)."""
        documents, damaged = self.scan()
        for record in damaged:
            warn_damaged(record)
        return documents


_WARNED: set[str] = set()


def warn_damaged(record: DamagedRecord) -> None:
    """Say once per process that a damaged record is skipped, and what to do."""
    if str(record.path) in _WARNED:
        return
    _WARNED.add(str(record.path))
    print(f"gpuflow: warning: skipped: {record.one_line()}", file=sys.stderr, flush=True)
