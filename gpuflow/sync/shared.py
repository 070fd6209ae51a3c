"""One scan of a local tree for the syncs to several nodes (a multi-node run): N transfers, one scan.

A cluster's nodes each get the same project (and ``--data``), but each node's
destination differs (a fresh node lacks everything, another holds last run's
copy), so every node has its own listing, plan and transfer.  What they share
is the local side: the walk of the tree, its ``stat`` calls and the ignore
rules, done once.

Two ways to share it:

* :func:`~gpuflow.sync.engine.sync_many`: the caller has the destinations at hand; the tree is
  scanned once and handed to each :func:`~gpuflow.sync.engine.sync_directory`
  (its ``tree=`` option), the transfers run in parallel;
* :class:`SharedScans`: each node's sync is started separately (a closure per
  node, run in parallel by the run's launcher); syncs of the same source that
  overlap in time share the first one's scan.  A sync that starts after every
  other sync of that source has ended scans again: the tree may have changed
  since, and a sync never sends an old picture of it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gpuflow.sync.ignore import SourceTree

ScanKey = tuple[str, frozenset[str]]


class _Held:
    """One source's scan while syncs of it are running: how many hold it, and the tree once scanned."""

    def __init__(self) -> None:
        self.users = 0
        self.lock = threading.Lock()  # the first user scans under it; the others wait for its tree
        self.tree: SourceTree | None = None


class SharedScans:
    """Scans of local trees shared by syncs that overlap in time (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[ScanKey, _Held] = {}
        self.scans = 0  # how many scans were made (not shared): for tests and reports

    @staticmethod
    def key(source: Path, skip_top_level: Iterable[str]) -> ScanKey:
        return os.path.realpath(source), frozenset(skip_top_level)

    @contextmanager
    def hold(self, key: ScanKey, scan: Callable[[], SourceTree]) -> Iterator[Callable[[], SourceTree]]:
        """While the block runs, the returned function gives the source's tree:
        the scan a concurrent holder made, else a new one (``scan``)."""
        with self._lock:
            held = self._held.get(key)
            if held is None:
                held = self._held[key] = _Held()
            held.users += 1

        def tree() -> SourceTree:
            with held.lock:
                if held.tree is None:
                    held.tree = scan()
                    with self._lock:
                        self.scans += 1
                return held.tree

        try:
            yield tree
        finally:
            with self._lock:
                held.users -= 1
                if held.users == 0 and self._held.get(key) is held:
                    del self._held[key]  # the next sync of this source scans afresh
