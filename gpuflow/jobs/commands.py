"""The use cases on a recorded run: ``gpuflow logs``, ``pull``, ``stop`` and ``runs`` (its status checked on its cluster)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from gpuflow.errors import GpuflowError, InstanceGone, NotFound, UnsafePath
from gpuflow.jobs.connection import Connection, instance_gone
from gpuflow.jobs.follow import LIVENESS_INTERVAL, JobVanished, follow_log
from gpuflow.jobs.pulling import pull_with_reconnect
from gpuflow.jobs.records import (
    STOP_GRACE_SECONDS,
    ListedRun,
    PullReport,
    RunRecord,
    RunState,
    RunStatus,
    Say,
    StopOutcome,
    all_records,
    iso,
    load_record,
    lose,
    quiet,
    save_record,
    utc_now,
)
from gpuflow.jobs.rundir import (
    classify,
    ended_status,
    interruption_text,
    job_liveness,
    lost_reason,
    read_exit_code,
    read_interruption,
    run_status,
    stop_job,
)
from gpuflow.jobs.targets import TargetResolver, target_for_cluster


def logs(
    run_id: str,
    *,
    out: BinaryIO,
    follow: bool = False,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    say: Say = quiet,
    poll_interval: float = 0.5,
    reconnect_timeout: float = 300,
    liveness_interval: float = LIVENESS_INTERVAL,
) -> int | None:
    """``gpuflow logs RUN [-f]``: print the log (and keep following it).

    Returns the job's exit code if it has ended, else None.  Following a job
    that vanishes without an exit code (or whose cluster is gone) records the
    run as lost and raises :class:`RunLost` with the reason.
    """
    record = load_record(run_id, home)
    following = follow and not record.finished
    try:
        target = resolve(record.cluster)
        # Connecting to a terminated sandbox instance would re-create its directory: ask first.
        gone = instance_gone(target) if following else None
        if gone is not None:
            raise lose(record, gone, home)
        runner = target.connect()
    except (NotFound, InstanceGone) as exc:
        if not following:
            raise
        raise lose(record, f"its cluster {record.cluster} is gone ({exc.message})", home) from exc
    connection = Connection(target, runner, reconnect_timeout, say)
    try:
        try:
            exit_code, _offset = follow_log(
                connection, record.remote_dir, out, poll_interval=poll_interval, follow=follow,
                liveness_interval=liveness_interval, on_notice=lambda notice: say(f"run {run_id}: {notice}"),
            )
        except JobVanished as vanished:
            if record.finished:  # its outcome is known: a run directory deleted since does not change it
                raise NotFound(
                    f"run {record.run_id} {record.status_text()}, but {vanished.reason}",
                    hint=f"its pulled log is in {record.local_dir}",
                ) from vanished
            raise lose(record, vanished.reason, home) from vanished
        if exit_code is not None and not record.finished:
            runner = connection.runner
            save_record(record.with_status(ended_status(runner, record.remote_dir, exit_code), lost_reason=None,
                                           interruption=read_interruption(runner, record.remote_dir)), home)
        return exit_code
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def pull(
    run_id: str,
    *,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    say: Say = quiet,
) -> tuple[RunRecord, PullReport]:
    """``gpuflow pull RUN``: fetch the run's files now (also while it runs)."""
    record = load_record(run_id, home)
    target = resolve(record.cluster)
    connection = Connection(target, target.connect(), 60, say)
    try:
        try:
            return pull_with_reconnect(connection, record, home=home, say=say)
        except UnsafePath as refusal:  # the job's outcome was recorded all the same: say it too
            refusal.message = f"run {run_id}: job {load_record(run_id, home).status_text()}; {refusal.message}"
            raise
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def stop(
    run_id: str,
    *,
    grace_seconds: float = STOP_GRACE_SECONDS,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
) -> tuple[RunRecord, StopOutcome]:
    """``gpuflow stop RUN``: save and stop — SIGTERM the job's process group (a training
    module saves its checkpoint and exits 75: ``interrupted``), SIGKILL after the grace period."""
    record = load_record(run_id, home)
    target = resolve(record.cluster)
    runner = target.connect()
    liveness = None
    try:
        outcome = stop_job(runner, record.remote_dir, grace_seconds=grace_seconds)
        exit_code = read_exit_code(runner, record.remote_dir)
        if exit_code is None:  # nobody recorded how it ended: is anything of it left?
            liveness = job_liveness(runner, record.remote_dir)
        else:
            status = ended_status(runner, record.remote_dir, exit_code)
    finally:
        with contextlib.suppress(Exception):
            runner.close()
    if exit_code is not None:
        record = record.with_status(status, ended_at=iso(utc_now()))
        save_record(record, home)
    elif (liveness is None and outcome is StopOutcome.GONE) or (
        liveness is not None and liveness.exit_code is None and not liveness.alive
    ):
        # no exit code and no process proven to be the job or its supervisor: what `runs` calls lost
        reason = lost_reason(liveness, record.remote_dir) if liveness is not None else "no process of the job is left"
        record = replace(record, status=RunState.LOST, lost_reason=reason)
        save_record(record, home)
    return record, outcome


def list_runs(
    *,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    refresh: bool = True,
) -> list[ListedRun]:
    """``gpuflow runs``: every known run with its status, newest first.

    Runs not known to be finished are checked on their cluster (one command
    per cluster): 'running', 'succeeded', 'failed(N)', or 'lost' (no exit code
    and no live job, or the cluster is gone); 'unreachable' when the cluster
    cannot be reached right now.
    """
    records = sorted(all_records(home), key=lambda record: record.run_id, reverse=True)
    statuses: dict[str, RunStatus] = {}
    if refresh:
        by_cluster: dict[str, list[RunRecord]] = {}
        for record in records:
            if not record.finished:
                by_cluster.setdefault(record.cluster, []).append(record)
        for cluster_name, pending in by_cluster.items():
            statuses.update(_refresh_cluster(cluster_name, pending, resolve=resolve, home=home))
    result = []
    for record in records:
        if record.run_id in statuses:
            record = load_record(record.run_id, home)
            status = statuses[record.run_id]
        else:
            status = record.run_status
        result.append(ListedRun(record, status))
    return result


def _refresh_cluster(
    cluster_name: str, pending: list[RunRecord], *, resolve: TargetResolver, home: Path | None
) -> dict[str, RunStatus]:
    unreachable = RunStatus(RunState.UNREACHABLE)
    try:
        target = resolve(cluster_name)
        runner = target.connect()
    except (NotFound, InstanceGone) as exc:  # the cluster or its instance is gone: so are its runs
        return _mark_lost(pending, home, f"its cluster {cluster_name} is gone ({exc.message})")
    except GpuflowError:  # cannot tell right now (network, credentials, host key): say so, keep the record
        return {record.run_id: unreachable for record in pending}
    try:
        reports = run_status(runner, *(record.remote_dir for record in pending))
    except InstanceGone as exc:
        return _mark_lost(pending, home, f"its instance is gone ({exc.message})")
    except (GpuflowError, OSError, json.JSONDecodeError):
        return {record.run_id: unreachable for record in pending}
    finally:
        with contextlib.suppress(Exception):
            runner.close()
    statuses = {}
    for record in pending:
        report = reports.get(record.remote_dir, {})
        status = classify(report)
        if status != record.run_status:
            reason = "no exit code and no live job" if status.state is RunState.LOST else None
            save_record(record.with_status(status, lost_reason=reason,
                                           interruption=interruption_text(report.get("interruption"))), home)
        statuses[record.run_id] = status
    return statuses


def _mark_lost(pending: list[RunRecord], home: Path | None, reason: str) -> dict[str, RunStatus]:
    for record in pending:
        if record.status is not RunState.LOST or not record.lost_reason:  # the first reason found stays
            save_record(replace(record, status=RunState.LOST, lost_reason=reason), home)
    return {record.run_id: RunStatus(RunState.LOST) for record in pending}
