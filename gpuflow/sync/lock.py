"""The destination's sync lock: its file, how long a second sync waits, and the local holder.

Two syncs to one destination at once (two terminals, a laptop and CI) would
interleave their deletions and unpacking.  Each sync holds an exclusive lock on
a file beside the destination (``<dir>.gpuflow-sync.lock``, outside the
mirrored tree) for its whole session; a second one waits up to
``SYNC_LOCK_WAIT_SECONDS``, saying so, then gives up.  Locally the lock is
:func:`gpuflow.state.locked`; over SSH it is ``flock(1)`` held by the remote
session itself (see :mod:`gpuflow.sync.exchange`), so a dropped connection
frees it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from gpuflow.errors import StateError
from gpuflow.state import locked

SYNC_LOCK_SUFFIX = ".gpuflow-sync.lock"
SYNC_LOCK_WAIT_SECONDS = 600
LOCK_EXIT_CODE = 6  # the remote session's exit status when its wait for the lock ran out


def lock_path(directory: Path) -> Path:
    return directory.parent / (directory.name + SYNC_LOCK_SUFFIX)


def lock_timeout(where: str, waited: float) -> StateError:
    return StateError(
        f"another sync to {where} still holds its lock after {waited:g} s",
        hint="let it finish (or stop it) and sync again",
    )


@contextlib.contextmanager
def local_sync_lock(directory: Path, warn: Callable[[str], None], wait_seconds: float) -> Iterator[None]:
    """Hold ``<directory>.gpuflow-sync.lock`` exclusively, waiting up to ``wait_seconds``."""
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)

    def say_we_wait() -> None:
        warn(f"another sync to {directory} is running; waiting for it to finish")

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locked(path, timeout=wait_seconds, on_wait=say_we_wait))
        except TimeoutError:
            raise lock_timeout(str(directory), wait_seconds) from None
        yield
