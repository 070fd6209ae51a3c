"""Following a run's log from a byte offset until its job ends, vanishes, or its instance goes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import BinaryIO

from gpuflow.errors import InstanceGone
from gpuflow.jobs.connection import TRANSIENT, Connection
from gpuflow.jobs.records import LOG_NAME, READ_CHUNK
from gpuflow.jobs.rundir import Liveness, job_liveness, lost_reason, read_exit_code

# While following a job without an exit code, how often gpuflow checks that it
# still lives (one short command on the instance): a job that vanished is
# noticed within about this long.
LIVENESS_INTERVAL = 5.0


class JobVanished(Exception):
    """Raised by :func:`follow_log`: the job is gone without an exit code (``reason`` says how)."""

    def __init__(self, reason: str, offset: int, *, run_dir_exists: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset
        self.run_dir_exists = run_dir_exists


def _vanished(connection: Connection, remote_dir: str, liveness: Liveness | None) -> tuple[str, bool] | None:
    """(why, whether the run directory is still there) when the job is gone
    without an exit code; None while it lives, has ended, or nobody can tell."""
    if liveness is None or liveness.exit_code is not None or liveness.alive:
        return None
    gone = connection.instance_gone()
    if gone is not None:
        return gone, liveness.exists
    return lost_reason(liveness, remote_dir), liveness.exists


# The first poll comes this soon, each next one half as late again, up to ``poll_interval``:
# polls at 0.05, 0.125, 0.24, 0.41, 0.66, 1.04 s, then every 0.5 s (with twice as late each
# time, a job ending at 0.2 s was seen at 0.35 s; one poll is a read or two over the open
# connection, so the few more of the first second cost nothing that shows).
FIRST_POLL_SECONDS = 0.05
POLL_GROWTH = 1.5


def follow_log(
    connection: Connection,
    remote_dir: str,
    out: BinaryIO,
    *,
    offset: int = 0,
    poll_interval: float = 0.5,
    follow: bool = True,
    liveness_interval: float = LIVENESS_INTERVAL,
    on_notice: Callable[[str], None] | None = None,
) -> tuple[int | None, int]:
    """Copy ``job.log`` from byte ``offset`` to ``out``; with ``follow`` until
    the job has ended and the log is fully read (polled after
    ``FIRST_POLL_SECONDS``, then ``POLL_GROWTH`` times as late each time up to ``poll_interval``).

    Returns (exit code or None, final offset).  The offset advances only by
    bytes already written to ``out``, and the exit code is checked *before*
    the final read, so after a reconnect nothing is repeated or lost.

    While following, every ``liveness_interval`` seconds without an exit code
    the job is checked by identity (:func:`job_liveness`): a job whose process
    and supervisor are gone, a deleted run directory or a terminated instance
    end the loop with :class:`JobVanished` (after the log is drained).  The same
    check finds the spot-interruption watcher's notices: each is told once to
    ``on_notice`` (a rebalance recommendation, an interruption notice the job was
    stopped for).
    """
    log_path = f"{remote_dir}/{LOG_NAME}"

    def drain() -> None:
        nonlocal offset
        while chunk := connection.runner.read_from(log_path, offset, READ_CHUNK):
            out.write(chunk)
            out.flush()
            offset += len(chunk)

    next_check = time.monotonic() + liveness_interval
    told: set[str] = set()
    wait = min(FIRST_POLL_SECONDS, poll_interval)
    try:
        while True:
            try:
                exit_code = read_exit_code(connection.runner, remote_dir)
                drain()
                if exit_code is None and follow and time.monotonic() >= next_check:
                    liveness = job_liveness(connection.runner, remote_dir)
                    if liveness is not None and on_notice is not None:
                        stopping = liveness.interruption and f"{liveness.interruption}: the job was asked to save and stop"
                        for notice in (liveness.rebalance, stopping):
                            if notice and notice not in told:
                                told.add(notice)
                                on_notice(notice)
                    vanished = _vanished(connection, remote_dir, liveness)
                    next_check = time.monotonic() + liveness_interval
                    if vanished is not None:
                        drain()  # its last words, written before it died
                        raise JobVanished(vanished[0], offset, run_dir_exists=vanished[1])
            except TRANSIENT as exc:
                connection.reconnect(exc)  # raises InstanceGone for a terminated instance
                continue
            if exit_code is not None or not follow:
                return exit_code, offset
            time.sleep(wait)
            wait = min(poll_interval, wait * POLL_GROWTH)  # a short job is seen to end at once; a long one polled calmly
    except InstanceGone as exc:
        if not follow:
            raise
        reason = connection.instance_gone() or f"its instance is gone ({exc.message})"
        raise JobVanished(reason, offset, run_dir_exists=False) from exc
