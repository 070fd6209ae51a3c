"""``gpuflow resume RUN --on NAME | --up``: an interrupted run continued on another cluster, later.

The run's own cluster (``gpuflow resume RUN`` alone, or ``run --resume RUN``) is
:func:`gpuflow.jobs.resume.resume`: its job started again in place.  On another
cluster the run continues as ``run --recover`` does after a relaunch
(:func:`gpuflow.jobs.recover.run_with_recovery` with ``previous``): the next
attempt of the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from gpuflow.errors import UsageError
from gpuflow.jobs.on_cluster import run_on_cluster
from gpuflow.jobs.records import InterruptChoice, RunOutcome, RunRecord, RunState, Say, load_record, quiet
from gpuflow.jobs.recover import RecoveryPolicy


def resume_elsewhere(
    run_id: str,
    cluster_name: str,
    *,
    out: BinaryIO,
    policy: RecoveryPolicy | None = None,
    up_spec: Any = None,
    down: bool = False,
    on_interrupt: Callable[[RunRecord], InterruptChoice] | None = None,
    home: Path | None = None,
    say: Say = quiet,
    **options: Any,
) -> RunOutcome:
    """``gpuflow resume RUN --on NAME | --up``: start run ``run_id``'s job again on cluster
    ``cluster_name`` (launched first with ``up_spec``), its earlier cluster gone or not, as the
    next attempt of the same run: same id, command, ``--env`` and ``--data``, its pulled log first.
    The durable store restores its latest committed checkpoint on the node; without one the job
    starts over, and gpuflow says so.  Without ``policy`` it is not restarted again."""
    record = load_record(run_id, home)
    if record.status is RunState.RUNNING:
        raise UsageError(
            f"run {run_id} is recorded as running on {record.cluster}: nothing to resume",
            hint=f"`gpuflow stop {run_id}` saves and stops it; `gpuflow runs` checks it",
        )
    if record.status is RunState.SUCCEEDED:
        raise UsageError(f"run {run_id} succeeded: nothing to resume", hint="start a new run with `gpuflow run`")
    if record.args is None:
        raise UsageError(
            f"run {run_id} was started by an older gpuflow that did not record its arguments: it can only be "
            "resumed on its own cluster",
            hint=f"gpuflow resume {run_id}",
        )
    data_dir = Path(record.data_dir) if record.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise UsageError(f"run {run_id} used --data {data_dir}, and that directory is gone")
    return run_on_cluster(
        cluster_name, project_dir=Path(record.project_dir), module=record.module, args=list(record.args), out=out,
        up_spec=up_spec, down=down, on_interrupt=on_interrupt, say=say, home=home, data_dir=data_dir,
        env=record.job_env, recovery=policy or RecoveryPolicy(max_restarts=0), previous=record, **options,
    )
