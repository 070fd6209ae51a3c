"""``gpuflow run`` on a target: start the job detached, stream its log, pull its files, return or raise its outcome."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from gpuflow.durable.status import read_status as read_durable_status
from gpuflow.errors import GpuflowError, JobFailed, JobInterrupted
from gpuflow.jobs.connection import Connection
from gpuflow.jobs.follow import LIVENESS_INTERVAL, JobVanished, follow_log
from gpuflow.jobs.pulling import pull_with_reconnect
from gpuflow.jobs.records import (
    InterruptChoice,
    RunOutcome,
    RunRecord,
    RunState,
    RunTarget,
    STOP_GRACE_SECONDS,
    Say,
    lose,
    quiet,
    save_record,
)
from gpuflow.jobs.rundir import ended_status, read_interruption, stop_job
from gpuflow.jobs import workers


def run(
    target: RunTarget,
    *,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    out: BinaryIO,
    detach: bool = False,
    on_interrupt: Callable[[RunRecord], InterruptChoice] | None = None,
    home: Path | None = None,
    say: Say = quiet,
    heartbeat_seconds: float = 30,
    poll_interval: float = 0.5,
    reconnect_timeout: float = 300,
    run_id: str | None = None,
    data_dir: Path | None = None,
    liveness_interval: float = LIVENESS_INTERVAL,
    env: Mapping[str, str] | None = None,
    nodes: int | None = None,
) -> RunOutcome:
    """``gpuflow run``: start detached, stream the log, pull, return the outcome.

    Raises :class:`JobFailed` (carrying the job's exit code) when the job
    fails, after its outputs are pulled.  On Ctrl-C, ``on_interrupt(record)``
    answers :class:`InterruptChoice` STOP (stop the job, pull, fail) or DETACH (leave it running);
    without it gpuflow detaches.  ``env``: extra variables for the job (:func:`start_run`).  A job that vanishes without an exit code
    (:func:`follow_log`) makes the run ``lost``: :class:`RunLost`, after what
    is left of its files is pulled.

    The job's outcome is recorded before its files are pulled.  When the pull
    fails (a refused entry, an unreachable instance), a failed job still raises
    :class:`JobFailed` with its own exit code, naming the pull's failure too; a
    succeeded job raises the pull's error, saying that the job succeeded.
    """
    connection = Connection(target, target.connect(), reconnect_timeout, say)
    try:
        record = workers.start(
            target,
            connection.runner,
            project_dir=project_dir,
            module=module,
            args=args,
            run_id=run_id,
            data_dir=data_dir,
            heartbeat_seconds=heartbeat_seconds,
            home=home,
            say=say,
            env=env,
            nodes=nodes,
        )
        if detach:
            return RunOutcome(record, None, detached=True)
        return follow_to_outcome(
            connection, record, out=out, on_interrupt=on_interrupt, home=home, say=say,
            poll_interval=poll_interval, liveness_interval=liveness_interval,
        )
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def follow_to_outcome(
    connection: Connection,
    record: RunRecord,
    *,
    out: BinaryIO,
    offset: int = 0,
    on_interrupt: Callable[[RunRecord], InterruptChoice] | None = None,
    home: Path | None = None,
    say: Say = quiet,
    poll_interval: float = 0.5,
    liveness_interval: float = LIVENESS_INTERVAL,
) -> RunOutcome:
    """Stream a started run's log from ``offset`` until its job ends, record its
    outcome, pull its files, and return it — or raise it: :class:`JobFailed`,
    :class:`JobInterrupted` (it saved a checkpoint and exited 75: resumable),
    :class:`RunLost` (see :func:`run`)."""
    stopped = False
    while True:
        try:
            exit_code, offset = follow_log(
                connection, record.remote_dir, out, offset=offset, poll_interval=poll_interval,
                liveness_interval=liveness_interval, on_notice=lambda notice: say(f"run {record.run_id}: {notice}"),
            )
            break
        except JobVanished as vanished:
            if vanished.run_dir_exists:  # what the job left (its log, a checkpoint) is still worth having
                try:
                    pull_with_reconnect(connection, record, home=home, say=say)
                except GpuflowError as pull_error:
                    say(f"pulling what the lost run left failed: {pull_error.one_line()}")
            raise lose(record, vanished.reason, home) from vanished
        except KeyboardInterrupt:
            choice = on_interrupt(record) if on_interrupt is not None else InterruptChoice.DETACH
            if InterruptChoice(choice) is not InterruptChoice.STOP:
                return RunOutcome(record, None, detached=True)
            say(f"stopping run {record.run_id} (it may save a checkpoint first)")
            if record.workers:  # every node's job
                workers.stop_nodes(connection.target, record, grace_seconds=STOP_GRACE_SECONDS, only=None)
            else:
                stop_job(connection.runner, record.remote_dir)
            stopped = True
    # The outcome is known now: record it before the pull, which may fail.
    followed_exit_code = exit_code  # what this node's run directory says (the pull need not read it again)
    status = ended_status(connection.runner, record.remote_dir, exit_code)
    if record.workers:  # a multi-node run: its status is all its nodes' (and nothing of it is left running)
        status = workers.settle(connection.target, record, say=say)
        exit_code = status.exit_code if status.exit_code is not None else exit_code
    record = record.with_status(
        status, lost_reason=None, interruption=read_interruption(connection.runner, record.remote_dir),
        failure=status.note if status.state is RunState.FAILED else None,
    )
    save_record(record, home)
    durable = read_durable_status(connection.runner, record.remote_dir) if record.durable else None
    durable_problem = durable.problem() if durable is not None else None
    if durable_problem:  # loud: what was never made durable (the sagemaker#3062 failure mode)
        say(f"run {record.run_id}: {durable_problem}")
        record = replace(record, durable_problem=durable_problem)
        save_record(record, home)
    if status.state is RunState.INTERRUPTED:
        ended = str(status)
    else:
        ended = f"{'was stopped' if stopped else 'failed'} with exit code {exit_code}"
        if status.state is RunState.FAILED and status.note:
            ended += f" ({status.note})"
    try:
        record, report = pull_with_reconnect(connection, record, home=home, say=say, exit_code=followed_exit_code)
    except GpuflowError as pull_error:
        if exit_code == 0:  # the pull's own failure decides: say that the job itself succeeded
            pull_error.message = (
                f"run {record.run_id} succeeded, but pulling its files failed: {pull_error.message}"
            )
            raise
        if status.state is RunState.INTERRUPTED:
            raise interrupted_error(record, f"; pulling its files failed: {pull_error.one_line()}") from pull_error
        # A failed job's exit code wins; the pull's failure is reported with it.
        raise JobFailed(
            f"run {record.run_id} {ended}; pulling its files failed too: {pull_error.one_line()}",
            job_exit_code=int(exit_code),
            run_id=record.run_id,
            hint=f"what was pulled is in {record.local_dir}",
        ) from pull_error
    outcome = RunOutcome(record, exit_code, pull=report, stopped=stopped)
    if status.state is RunState.INTERRUPTED:
        raise interrupted_error(record, f"; {durable_problem}" if durable_problem else "")
    if exit_code != 0:
        raise JobFailed(
            f"run {record.run_id} {ended}",
            job_exit_code=int(exit_code),
            run_id=record.run_id,
            hint=f"its log and outputs are in {record.local_dir}",
        )
    return outcome


def interrupted_error(record: RunRecord, more: str = "") -> JobInterrupted:
    """What `run`, `run --resume` and `logs -f` say of a job that saved a checkpoint and exited 75."""
    why = f" after a {record.interruption}" if record.interruption else ""
    return JobInterrupted(
        f"run {record.run_id} {record.status_text()}{why}{more}",
        run_id=record.run_id,
        hint=f"continue it with `gpuflow run --resume {record.run_id}`; what was pulled is in {record.local_dir}",
    )
