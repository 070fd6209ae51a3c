"""``gpuflow run --resume RUN``: start an interrupted (or failed or lost, with a checkpoint) run's job again.

The job runs again on the run's cluster, in the same run directory, with the
same command and environment (its ``supervisor.sh``): its outputs and
checkpoint are where it left them, so a training module continues at the step
after its checkpoint, and its output is appended to the same ``job.log``.  The
previous attempt's files (exit code, pids, the watcher's notices) move to
``attempts/<n>/`` on the instance; the run's record and its pulled manifest
list every resume (:class:`~gpuflow.jobs.records.Resume`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from gpuflow.errors import InstanceGone, NotFound, RemoteCommandFailed, UsageError
from gpuflow.jobs import scripts
from gpuflow.jobs.connection import Connection, instance_gone
from gpuflow.jobs.follow import LIVENESS_INTERVAL
from gpuflow.jobs.foreground import follow_to_outcome
from gpuflow.jobs.pulling import list_remote_tree
from gpuflow.jobs.records import (
    CHECKPOINT_STATE,
    EXIT_CODE_NAME,
    PID_NAME,
    SUPERVISOR_NAME,
    Checkpoint,
    InterruptChoice,
    Resume,
    RunOutcome,
    RunRecord,
    RunState,
    Say,
    iso,
    load_record,
    quiet,
    save_record,
    utc_now,
)
from gpuflow.jobs.rundir import classify, run_status
from gpuflow.jobs.start import wait_for_start
from gpuflow.jobs.targets import TargetResolver, target_for_cluster
from gpuflow.transport.base import CommandRunner

_STARTED = re.compile(r"^gpuflow-resume: attempt (\d+) offset (\d+)$", re.MULTILINE)
_REFUSED = re.compile(r"^gpuflow-resume: (busy|alive|succeeded|gone)$", re.MULTILINE)


def resume(
    run_id: str,
    *,
    out: BinaryIO,
    detach: bool = False,
    on_interrupt: Callable[[RunRecord], InterruptChoice] | None = None,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    say: Say = quiet,
    poll_interval: float = 0.5,
    reconnect_timeout: float = 300,
    liveness_interval: float = LIVENESS_INTERVAL,
) -> RunOutcome:
    """Start run ``run_id``'s job again where it stopped, then follow it as ``gpuflow run`` does
    (``detach``: return once it has started).  Refused with one line (:class:`UsageError`)
    for a run that is running or succeeded, or failed or was lost without a checkpoint;
    :class:`NotFound` when its cluster or run directory is gone."""
    record = load_record(run_id, home)
    if record.workers:  # every node would have to restart together, from the same step
        raise UsageError(
            f"run {run_id} ran on {len(record.workers)} nodes: --resume continues runs of one node only",
            hint="start it again with `gpuflow run`",
        )
    try:
        target = resolve(record.cluster)
        gone = instance_gone(target)  # asked first: connecting to a terminated sandbox instance re-creates it
        if gone is not None:
            raise InstanceGone(gone)
        runner = target.connect()
    except (NotFound, InstanceGone) as exc:
        raise NotFound(
            f"run {run_id} cannot be resumed: its cluster {record.cluster} is gone ({exc.message})",
            hint=f"continue it on another cluster: `gpuflow resume {run_id} --up` (or --on NAME); "
            f"what was pulled is in {record.local_dir}",
        ) from exc
    connection = Connection(target, runner, reconnect_timeout, say)
    try:
        report = run_status(runner, record.remote_dir)[record.remote_dir]
        if not report.get("exists"):
            raise NotFound(
                f"run {run_id} cannot be resumed: its run directory {record.remote_dir} is gone",
                hint=f"what was pulled is in {record.local_dir}",
            )
        status = classify(report)
        checkpoint = Checkpoint.parse(report.get("checkpoint"))
        _refuse_unless_resumable(record, status.state, str(status), checkpoint)
        previous_seconds = _attempt_seconds(runner, record)
        attempt, offset = _start_again(runner, record)
        entry = Resume(
            at=iso(utc_now()),
            attempt=attempt,
            previous_status=str(status),
            previous_exit_code=status.exit_code,
            checkpoint=checkpoint,
            previous_duration_seconds=previous_seconds,
        )
        record = replace(
            record, status=RunState.RUNNING, exit_code=None, ended_at=None, lost_reason=None, checkpoint=None,
            interruption=None, resumes=(*record.resumes, entry),
        )
        save_record(record, home)
        wait_for_start(runner, record.remote_dir)
        where = f"at the step after {checkpoint}" if checkpoint else "from its last checkpoint"
        say(f"run {run_id} resumed on {record.cluster} {where} (it was {status}); log appended to job.log")
        if detach:
            return RunOutcome(record, None, detached=True)
        return follow_to_outcome(
            connection, record, out=out, offset=offset, on_interrupt=on_interrupt, home=home, say=say,
            poll_interval=poll_interval, liveness_interval=liveness_interval,
        )
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def _refuse_unless_resumable(record: RunRecord, state: RunState, shown: str, checkpoint: Checkpoint | None) -> None:
    run_id = record.run_id
    if state is RunState.RUNNING:
        raise UsageError(
            f"run {run_id} is still running: nothing to resume",
            hint=f"`gpuflow stop {run_id}` saves and stops it; resume it after",
        )
    if state is RunState.SUCCEEDED:
        raise UsageError(f"run {run_id} succeeded: nothing to resume", hint="start a new run with `gpuflow run`")
    if state in (RunState.FAILED, RunState.LOST) and checkpoint is None:
        raise UsageError(
            f"run {run_id} {shown} and left no complete checkpoint ({CHECKPOINT_STATE}): nothing to resume from",
            hint="start it again with `gpuflow run`",
        )


def _attempt_seconds(runner: CommandRunner, record: RunRecord) -> float | None:
    """How long the job ran, over every attempt until now (instance clock: job.pid's and exit_code's mtimes)."""
    times = {entry.get("path"): entry.get("mtime") for entry in list_remote_tree(runner, record.remote_dir, (PID_NAME, EXIT_CODE_NAME))}
    if times.get(PID_NAME) is None or times.get(EXIT_CODE_NAME) is None:
        return record.resumes[-1].previous_duration_seconds if record.resumes else None
    this = max(0.0, float(times[EXIT_CODE_NAME]) - float(times[PID_NAME]))
    earlier = record.resumes[-1].previous_duration_seconds if record.resumes else None
    return round(this + (earlier or 0.0), 1)


def _start_again(runner: CommandRunner, record: RunRecord) -> tuple[int, int]:
    """Move the last attempt aside and start the supervisor again (one locked script on the
    instance); returns (the attempt number its files moved to, the log's size before)."""
    script = scripts.resume_script(run_dir=record.remote_dir, python=runner.python, script_name=SUPERVISOR_NAME)
    result = runner.run_script(script, timeout=120, check=False)
    said = result.stdout.decode(errors="replace")
    refused = _REFUSED.search(said)
    if refused is not None:
        why = {
            "busy": "another `gpuflow run --resume` of it is starting it right now",
            "alive": "its job or its supervisor is running again",
            "succeeded": "it succeeded",
            "gone": f"its run directory {record.remote_dir} is gone",
        }[refused.group(1)]
        raise UsageError(f"run {record.run_id} was not resumed: {why}", hint="`gpuflow runs` shows its status")
    started = _STARTED.search(said)
    if started is None:
        raise RemoteCommandFailed(
            f"could not start run {record.run_id} again: {result.stderr.decode(errors='replace').strip()[-300:]}",
            hint="the instance needs bash, flock and setsid (util-linux) and nohup",
        )
    return int(started.group(1)), int(started.group(2))

