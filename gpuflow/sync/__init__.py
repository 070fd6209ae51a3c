"""``gpuflow sync``: push a project (or a data directory) to an instance.

How a sync works, whatever the destination:

1. :func:`gpuflow.sync.ignore.scan_tree` lists the local files (``.gitignore``,
   ``.gpuflowignore``, fixed skips, symlink policy) with size, mtime and mode,
   and the directories it keeps (empty ones too).
2. One look at the destination lists what is already there (size, mtime,
   mode, link target; never following links), compared with the scanned tree
   as it streams in: a file the destination holds as the tree does is only
   marked (one byte), so a no-change sync of 50,000 files keeps no object per file.  Over SSH this is the first
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
   A kept directory the destination lacks, and that no sent file creates (an
   empty ``checkpoints/``), is made after the deletions.
4. Only the files in the plan travel.  Over SSH, the deletions and a
   tar stream of the planned files (gzip-compressed when it pays:
   :mod:`~gpuflow.sync.compress`) go down the listing session's
   stdin (written here, pax format, headers as :mod:`tarfile` writes them; ``tar -xpf -`` there):
   one connection, one remote shell for the whole sync.  rsync (``--files-from``
   the plan, NUL-separated, over the same multiplexed connection) is used when
   it can save bytes: when the plan rewrites at least ``RSYNC_DELTA_MIN_BYTES``
   of files the destination already holds an older version of, so its delta
   transfer sends only the changed blocks; ``method="rsync"`` forces it,
   ``method="tar"`` forbids it.  Before either, with ``auto``, a changed file the
   destination holds a large version of travels as its changed blocks
   (:mod:`~gpuflow.sync.blockdelta`; shifted content still goes to rsync).  To a local directory: a Python copy (temp
   file + rename, mtime and mode kept).

A no-change re-sync therefore costs one SSH connection and one remote
``find``: no rsync process, no file list exchange; a first sync or an edit
costs one connection plus the bytes of the changed files.

Why the destination listing and not a local manifest of the last sync: the
listing is the truth (another laptop, or a job, may have changed the remote
tree) and, over a multiplexed connection, it is as cheap as reading a local
file would be worth; a cache could only add a way to be wrong.

SSH always runs as ``ssh -F none`` with the options of
:mod:`gpuflow.transport.openssh` (the same as `gpuflow ssh`): the cluster's
pinned known_hosts, ``StrictHostKeyChecking=yes`` (a target explicitly marked
trust-on-first-use has its key pinned by the paramiko runner first),
``BatchMode`` and ``IdentitiesOnly``: a changed
host key ends the sync with :class:`~gpuflow.errors.HostKeyMismatch`, an
unreachable host with :class:`~gpuflow.errors.UnreachableHost`, never a
prompt or a hang.

Modules, each owning one thing: :mod:`~gpuflow.sync.ignore` (+ ``wildmatch``)
the file list; :mod:`~gpuflow.sync.plan` records and the plan;
:mod:`~gpuflow.sync.session` the OpenSSH connection; :mod:`~gpuflow.sync.exchange`
the remote script; :mod:`~gpuflow.sync.transfer` tar and rsync;
:mod:`~gpuflow.sync.local` the local copy; :mod:`~gpuflow.sync.lock` the
destination lock; :mod:`~gpuflow.sync.progress` the progress bar;
:mod:`~gpuflow.sync.engine` one sync; :mod:`~gpuflow.sync.shared` one scan
for the syncs to several nodes; :mod:`~gpuflow.sync.cluster` syncs to a
cluster (the ``gpuflow sync`` use case).
"""

from __future__ import annotations

from gpuflow.sync.cluster import data_name, destination_for, sync_cluster, sync_data, sync_project
from gpuflow.sync.engine import (
    DEFAULT_LARGE_BYTES,
    DEFAULT_LARGE_FILES,
    METHODS,
    RSYNC_DELTA_MIN_BYTES,
    scan_source,
    sync_directory,
    sync_many,
)
from gpuflow.sync.exchange import parse_find_listing
from gpuflow.sync.local import list_local_destination
from gpuflow.sync.lock import SYNC_LOCK_SUFFIX, SYNC_LOCK_WAIT_SECONDS
from gpuflow.sync.plan import (
    Destination,
    DestinationEntry,
    DestinationState,
    LocalDestination,
    SSHDestination,
    SyncPlan,
    SyncReport,
    needs_sending,
    plan_sync,
)
from gpuflow.sync.session import ssh_argv
from gpuflow.sync.shared import SharedScans

__all__ = [
    "DEFAULT_LARGE_BYTES",
    "DEFAULT_LARGE_FILES",
    "METHODS",
    "RSYNC_DELTA_MIN_BYTES",
    "SYNC_LOCK_SUFFIX",
    "SYNC_LOCK_WAIT_SECONDS",
    "Destination",
    "DestinationEntry",
    "DestinationState",
    "LocalDestination",
    "SSHDestination",
    "SharedScans",
    "SyncPlan",
    "SyncReport",
    "data_name",
    "destination_for",
    "list_local_destination",
    "needs_sending",
    "parse_find_listing",
    "plan_sync",
    "scan_source",
    "ssh_argv",
    "sync_cluster",
    "sync_data",
    "sync_directory",
    "sync_many",
    "sync_project",
]
