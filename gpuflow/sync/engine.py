"""``sync_directory``: one sync from a local tree to a destination (scan, list, plan, check, transfer, report)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuflow.errors import DataError, UsageError
from gpuflow.sync import blockdelta
from gpuflow.sync.compress import on_this_machine, worth_compressing
from gpuflow.sync.exchange import Exchange
from gpuflow.sync.ignore import LocalEntry, SourceTree, scan_tree
from gpuflow.sync.local import apply_local, list_local_destination
from gpuflow.sync.lock import SYNC_LOCK_WAIT_SECONDS, local_sync_lock
from gpuflow.sync.plan import (
    Destination,
    DestinationState,
    LocalDestination,
    SSHDestination,
    SyncPlan,
    SyncReport,
    human_bytes,
    plan_sync,
)
from gpuflow.sync.progress import Progress
from gpuflow.sync.session import SshSession, pin_on_first_use
from gpuflow.sync.shared import SharedScans
from gpuflow.sync.transfer import local_rsync_usable, send_rsync

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


def _stderr_warning(message: str) -> None:
    print(f"gpuflow: warning: {message}", file=sys.stderr)


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
    compress: bool | None = None


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
    tree: SourceTree | None = None,
    scans: SharedScans | None = None,
    compress: bool | None = None,
) -> SyncReport:
    """Make ``destination`` mirror ``source`` (after ignore rules); send only changes.

    ``method``: ``auto`` (over SSH: tar in the listing session, rsync when its
    delta transfer can save bytes and both ends have it; a Python copy for a
    local destination), or force ``rsync``/``tar``/``copy``.
    ``skip_top_level``: names skipped at the root besides the ignore rules.
    ``confirm_large`` is asked (with a one-line description) before sending
    more than ``large_bytes`` or ``large_files``; without it the sync warns
    through ``warn`` and goes on.  Another sync to the same destination is waited
    for, up to ``lock_wait`` seconds (see :mod:`gpuflow.sync.lock`).
    ``tree``: the source already scanned (:func:`scan_source` of the same
    ``source`` and ``skip_top_level``), for the syncs of one tree to several
    nodes; ``scans``: share the scan with the concurrent syncs of the same
    source (:class:`~gpuflow.sync.shared.SharedScans`).  ``compress``: whether
    a tar stream travels gzip-compressed (None: when it pays, see
    :mod:`gpuflow.sync.compress`; never without gzip on the destination).
    Returns a :class:`SyncReport`.
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
    options = _Options(method, dry_run, progress, large_bytes, large_files, confirm_large, warn, lock_wait, compress)

    if tree is not None:
        if os.path.realpath(tree.root) != os.path.realpath(source):
            raise UsageError(f"the scanned tree is of {tree.root}, not of {source}")
        scanned = tree
        return _sync(lambda: scanned, destination, options, started)
    if scans is None:
        return _sync(lambda: scan_source(source, skip_top_level=skip_top_level, warn=warn), destination, options, started)
    key = scans.key(source, skip_top_level)
    with scans.hold(key, lambda: scan_source(source, skip_top_level=skip_top_level, warn=warn)) as shared:
        return _sync(shared, destination, options, started)


def scan_source(
    source: Path, *, skip_top_level: Sequence[str] = (), warn: Callable[[str], None] | None = None
) -> SourceTree:
    """The one scan of a sync's source (ignore rules, link policy), warning about the links left out."""
    tree = scan_tree(Path(source).expanduser(), skip_top_level=skip_top_level)
    for link in tree.skipped_links[:3]:
        (warn or _stderr_warning)(f"not sending symlink {link!r}: it is absolute or leads outside {source}")
    return tree


def _sync(scan: Callable[[], SourceTree], destination: Destination, options: _Options, started: float) -> SyncReport:
    if isinstance(destination, LocalDestination):
        return _sync_local(scan, destination, options, started)
    return _sync_ssh(scan, destination, options, started)


def _check_size(plan: SyncPlan, destination: Destination, options: _Options) -> None:
    if plan.bytes_to_send <= options.large_bytes and len(plan.to_send) <= options.large_files:
        return
    message = (
        f"about to send {len(plan.to_send):,} files ({human_bytes(plan.bytes_to_send)}) to {destination.describe()}; "
        "list big paths in .gpuflowignore, or sync data once with `gpuflow sync --data PATH`"
    )
    if options.confirm_large is None:
        options.warn(message)
    elif not options.confirm_large(message):
        raise UsageError("sync cancelled", hint="add large paths to .gpuflowignore, or pass --yes")


def _report(
    tree: SourceTree,
    destination: Destination,
    method: str,
    plan: SyncPlan,
    started: float,
    dry_run: bool,
    compressed: bool = False,
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
        directories_created=len(plan.to_create),
        created=plan.to_create,
        compressed=compressed,
    )


def _sync_local(
    scan: Callable[[], SourceTree], destination: LocalDestination, options: _Options, started: float
) -> SyncReport:
    tree = scan()
    directory = Path(destination.directory)
    if options.dry_run:
        plan = plan_sync(tree, list_local_destination(directory))
        return _report(tree, destination, "copy", plan, started, True)
    with local_sync_lock(directory, options.warn, options.lock_wait):
        # Listed under the lock: a sync that waited sees what the other one left.
        plan = plan_sync(tree, list_local_destination(directory))
        _check_size(plan, destination, options)
        bar = Progress(options.progress, plan.bytes_to_send, "sync")
        try:
            apply_local(tree.root, directory, plan, bar)
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


def _without(plan: SyncPlan, entries: Sequence[LocalEntry]) -> SyncPlan:
    """``plan`` less ``entries`` (sent another way)."""
    if not entries:
        return plan
    paths = {entry.path for entry in entries}
    return dataclasses.replace(plan, to_send=tuple(entry for entry in plan.to_send if entry.path not in paths))


def _carrier(plan: SyncPlan, state: DestinationState, *, shifted: bool) -> str:
    """How ``auto`` sends files whole or by rsync: rsync when its delta can save bytes (``shifted``:
    files the block delta left, whose blocks moved) and both ends have it, else tar."""
    worth_a_delta = shifted or _delta_basis_bytes(plan, state) >= RSYNC_DELTA_MIN_BYTES
    return "rsync" if plan.to_send and worth_a_delta and state.has_rsync and local_rsync_usable() else "tar"


def _compressed(
    plan: SyncPlan, state: DestinationState, destination: SSHDestination, tree: SourceTree, options: _Options
) -> bool:
    return bool(plan.to_send) and state.has_gzip and (
        options.compress
        if options.compress is not None
        else not on_this_machine(destination.target.host) and worth_compressing(tree.root, plan.to_send)
    )


def _sync_ssh(
    scan: Callable[[], SourceTree], destination: SSHDestination, options: _Options, started: float
) -> SyncReport:
    if shutil.which("ssh") is None:
        raise UsageError("the OpenSSH client `ssh` is not installed", hint="install openssh-client")
    pin_on_first_use(destination.target)
    session = SshSession(destination.target)
    exchange = None
    try:
        # Connect first and scan while the handshake runs: the scan is then free.
        exchange = Exchange(session, destination.directory, create=not options.dry_run, lock_wait=options.lock_wait)
        tree = scan()
        state = exchange.read_state(waiting=options.warn, tree=tree)
        if not state.listed:
            options.warn(f"cannot list {destination.describe()} (no GNU find there): sending every file, deleting none")
        if options.method == "rsync" and not (state.has_rsync and local_rsync_usable()):
            raise UsageError("rsync 3.1+ is missing on this machine or rsync on the target", hint="use --method tar")
        plan = plan_sync(tree, state)
        # `auto`: the large files the destination holds go by block delta (sync/blockdelta.py), the rest as before.
        by_blocks = blockdelta.candidates(plan, state) if options.method == "auto" else ()
        if options.method == "auto":
            chosen = "delta" if by_blocks else _carrier(plan, state, shifted=False)
        else:
            chosen = options.method
        compressed = chosen == "tar" and _compressed(plan, state, destination, tree, options)
        if options.dry_run:
            return _report(tree, destination, chosen, plan, started, True, compressed)
        _check_size(plan, destination, options)
        bar = Progress(options.progress, plan.bytes_to_send, f"sync ({chosen})")
        try:
            rest, carrier = plan, chosen
            if by_blocks:
                # While the listing session holds the lock, over the same connection.
                outcome = blockdelta.send_block_deltas(session, tree.root, destination.directory, by_blocks, progress=bar)
                placed = set(outcome.placed)
                rest = _without(plan, [entry for entry in by_blocks if entry.path in placed])
                # Shifted content: rsync's rolling delta finds the moved blocks; else the rest as before.
                carrier = _carrier(rest, state, shifted=bool(outcome.fallback))
                compressed = carrier == "tar" and _compressed(rest, state, destination, tree, options)
                chosen = "delta" if outcome.placed else carrier
            if carrier == "rsync" and rest.to_send:
                # Keep the listing session (the connection's master) open while rsync rides on it.
                exchange.finish(rest.to_delete, directories=rest.to_create, keep_open=True)
                send_rsync(session, tree.root, destination.directory, rest, bar)
                exchange.end()
            elif rest.to_send:
                exchange.finish(
                    rest.to_delete,
                    directories=rest.to_create,
                    tar_source=tree.root,
                    tar_entries=rest.to_send,
                    progress=bar,
                    compress=compressed,
                )
            else:
                exchange.finish(rest.to_delete, directories=rest.to_create)
        finally:
            bar.close()
        return _report(tree, destination, chosen, plan, started, False, compressed)
    finally:
        if exchange is not None:
            exchange.abandon()
        session.close()


def sync_many(source: Path, destinations: Sequence[Destination], **options: Any) -> list[SyncReport]:
    """Sync ``source`` to every destination in parallel after one scan; the
    reports in the destinations' order.  A failure is raised after every
    transfer has ended (the first one, in the destinations' order), so nothing
    is left running."""
    source = Path(source).expanduser()
    tree = scan_source(source, skip_top_level=options.get("skip_top_level", ()), warn=options.get("warn"))
    if not destinations:
        return []
    with ThreadPoolExecutor(max_workers=len(destinations)) as pool:
        futures = [pool.submit(sync_directory, source, destination, tree=tree, **options) for destination in destinations]
        errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]
