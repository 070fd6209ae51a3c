"""The use cases on a recorded run: ``gpuflow logs``, ``pull``, ``stop`` and ``runs`` (its status checked on its cluster)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from gpuflow.durable import fallback as durable_fallback
from gpuflow.errors import GpuflowError, InstanceGone, NotFound, RunLost, UnsafePath, UsageError
from gpuflow.jobs import workers
from gpuflow.jobs.connection import Connection, instance_gone
from gpuflow.jobs.follow import LIVENESS_INTERVAL, JobVanished, follow_log
from gpuflow.jobs.local_copy import holds_everything, missing_locally
from gpuflow.jobs.pulling import RunDirectoryGone, pull_with_reconnect
from gpuflow.jobs.records import (
    LOG_NAME,
    READ_CHUNK,
    STOP_GRACE_SECONDS,
    ListedRun,
    PullReport,
    RunRecord,
    RunState,
    RunStatus,
    RunTarget,
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
from gpuflow.transport.base import CommandRunner


class _FilesUnreachable(Exception):
    """The run's cluster (or its run directory there) is gone: nothing more can be had of it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _gone_reason(cluster_name: str, error: GpuflowError) -> str:
    """Why a run's files cannot be had from its cluster any more: the cluster is gone."""
    if isinstance(error, InstanceGone):
        return f"its cluster {cluster_name} is gone ({error.message})"
    return f"its cluster {cluster_name} is gone"


def _connect(cluster_name: str, resolve: TargetResolver) -> tuple[RunTarget, CommandRunner]:
    """The cluster's target and a runner on it; :class:`_FilesUnreachable` when it is gone."""
    try:
        target = resolve(cluster_name)
        # Connecting to a terminated sandbox instance would re-create its directory: ask first.
        gone = instance_gone(target)
        if gone is not None:
            raise InstanceGone(gone)
        return target, target.connect()
    except (NotFound, InstanceGone) as exc:
        raise _FilesUnreachable(_gone_reason(cluster_name, exc)) from exc


def _print_local_log(record: RunRecord, out: BinaryIO) -> None:
    """Copy the pulled ``job.log`` (when there is one) to ``out``."""
    path = Path(record.local_dir) / LOG_NAME
    if path.is_symlink() or not path.is_file():
        return
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            out.write(chunk)
    out.flush()


class _CountingOutput:
    """``out``, counting the bytes written to it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _named(paths: list[str]) -> str:
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return f"{shown} {'is' if len(paths) == 1 else 'are'}"


def _missing(record: RunRecord, reason: str, home: Path | None, paths: Sequence[str] | None = None) -> GpuflowError:
    """The one line that says what of the run is not here, and why it cannot be had
    (``reason``: its cluster is gone).  A run not known to have finished is lost now."""
    local_dir = Path(record.local_dir)
    if not record.finished:
        first_reason = record.lost_reason if record.status is RunState.LOST and record.lost_reason else reason
        save_record(replace(record, status=RunState.LOST, lost_reason=first_reason), home)
        what = (
            f"only what was pulled while it ran is in {local_dir}" if _has_files(local_dir) else "nothing of it was pulled"
        )
        return RunLost(f"run {record.run_id} is lost: {reason}; {what}")
    status = record.status_text()
    gaps = missing_locally(record, paths)
    if gaps:
        return NotFound(
            f"run {record.run_id} {status}, but {_named(gaps)} missing from {local_dir} and cannot be pulled again: "
            f"{reason}"
        )
    if not _has_files(local_dir):
        return NotFound(f"run {record.run_id} {status}, but nothing of it was pulled, and it cannot be now: {reason}")
    return NotFound(
        f"run {record.run_id} {status}, but the files in {local_dir} were not pulled completely after it ended "
        f"(its log and outputs may lack their end), and they cannot be pulled again: {reason}"
    )


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(path.is_file() for path in directory.rglob("*"))


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

    Returns the job's exit code if it has ended, else None.  A finished run
    whose whole log was pulled is printed from ``runs/<run-id>/job.log``
    without asking its cluster.  When the cluster is gone, what was pulled is
    printed and an error says what is missing and why (a run not known to have
    finished is then lost: :class:`RunLost`).  Following a job that vanishes
    without an exit code records the run as lost and raises :class:`RunLost`
    with the reason.
    """
    record = load_record(run_id, home)
    if holds_everything(record, (LOG_NAME,)):
        _print_local_log(record, out)
        return record.exit_code
    try:
        target, runner = _connect(record.cluster, resolve)
    except _FilesUnreachable as gone:
        record = _outcome_from_durable_copy(record, home)
        if _print_durable_log(record, out, say) and record.finished:
            return record.exit_code
        if not record.durable:
            _print_local_log(record, out)
        raise _missing(record, gone.reason, home, (LOG_NAME,)) from gone
    connection = Connection(target, runner, reconnect_timeout, say)
    printed = _CountingOutput(out)  # what the instance gave: the pulled log is printed only instead of it
    try:
        try:
            exit_code, _offset = follow_log(
                connection, record.remote_dir, printed, poll_interval=poll_interval, follow=follow,
                liveness_interval=liveness_interval, on_notice=lambda notice: say(f"run {run_id}: {notice}"),
            )
        except JobVanished as vanished:
            if record.finished:  # its outcome is known: a run directory deleted since does not change it
                if not printed.count:
                    _print_local_log(record, out)
                raise _missing(record, vanished.reason, home, (LOG_NAME,)) from vanished
            raise lose(record, vanished.reason, home) from vanished
        except InstanceGone as exc:  # found terminated on its first command (not following)
            if not printed.count:
                record = _outcome_from_durable_copy(record, home)
                if _print_durable_log(record, out, say) and record.finished:
                    return record.exit_code
                if not record.durable:
                    _print_local_log(record, out)
            raise _missing(record, _gone_reason(record.cluster, exc), home, (LOG_NAME,)) from exc
        if exit_code is None and record.finished:  # the instance no longer has its run directory
            if not printed.count:
                _print_local_log(record, out)
            raise _missing(record, f"its run directory is gone from cluster {record.cluster}", home, (LOG_NAME,))
        if exit_code is not None and not record.finished:
            runner = connection.runner
            status = ended_status(runner, record.remote_dir, exit_code)
            if record.workers:  # a multi-node run's status is all its nodes' (recorded once they all ended)
                status = workers.derive_status(workers.node_reports(target, record))
            if status.finished:
                save_record(record.with_status(status, lost_reason=None,
                                               interruption=read_interruption(runner, record.remote_dir),
                                               failure=status.note if status.state is RunState.FAILED else None), home)
        return exit_code
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def node_logs(
    run_id: str,
    *,
    out: BinaryIO,
    node: int | None = None,
    follow: bool = False,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    say: Say = quiet,
    poll_interval: float = 0.5,
    reconnect_timeout: float = 300,
) -> int | None:
    """``gpuflow logs RUN --node I [-f]`` (node ``node``'s log, as it is or followed) and
    ``--all`` (``node`` None: every node's log as it is now, each line prefixed by its node).
    Returns that node's exit code (``--all``: None)."""
    record = load_record(run_id, home)
    if not record.workers:
        if node in (None, 0):  # one node: it is the chief
            return logs(run_id, out=out, follow=follow, resolve=resolve, home=home, say=say,
                        poll_interval=poll_interval, reconnect_timeout=reconnect_timeout)
        raise UsageError(f"run {run_id} ran on one node (node 0)", hint=f"gpuflow logs {run_id}")
    if node is not None and not 0 <= node < len(record.workers):
        raise UsageError(
            f"run {run_id} ran on {len(record.workers)} nodes: there is no node {node}",
            hint=f"use --node 0 to --node {len(record.workers) - 1}",
        )
    chosen = [record.workers[node]] if node is not None else list(record.workers)
    try:
        target, probe = _connect(record.cluster, resolve)
        with contextlib.suppress(Exception):
            probe.close()
    except _FilesUnreachable as gone:  # what `run` copied of each node's log when it ended
        kept = [(worker, workers.worker_log_path(record, worker.index)) for worker in chosen]
        kept = [(worker, Path(record.local_dir) / LOG_NAME if worker.index == 0 else path) for worker, path in kept]
        if not all(path.is_file() for _worker, path in kept):
            raise _missing(record, gone.reason, home, (LOG_NAME,)) from gone
        for worker, path in kept:
            sink = out if node is not None else workers.PrefixedOutput(out, worker.index)
            sink.write(path.read_bytes())
            if isinstance(sink, workers.PrefixedOutput):
                sink.finish()
        out.flush()
        return record.exit_code if node is not None else None
    exit_code = None
    for worker in chosen:
        node_target = workers.node_target(target, worker)
        connection = Connection(node_target, node_target.connect(), reconnect_timeout, say)
        sink = out if node is not None else workers.PrefixedOutput(out, worker.index)
        try:
            exit_code, _offset = follow_log(connection, worker.remote_dir, sink, poll_interval=poll_interval,
                                            follow=follow)
        except JobVanished as vanished:
            raise RunLost(f"run {run_id}: node {worker.index}'s job is gone: {vanished.reason}") from vanished
        finally:
            if isinstance(sink, workers.PrefixedOutput):
                sink.finish()
            out.flush()
            with contextlib.suppress(Exception):
                connection.runner.close()
    return exit_code if node is not None else None


def pull(
    run_id: str,
    *,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    say: Say = quiet,
) -> tuple[RunRecord, PullReport]:
    """``gpuflow pull RUN``: fetch the run's files now (also while it runs).

    When the run's cluster (or its run directory) is gone, a finished run whose
    files are all here, as pulled after it ended, is reported as unchanged;
    otherwise an error says what is missing and why (a run not known to have
    finished is then lost)."""
    record = load_record(run_id, home)
    try:
        target, runner = _connect(record.cluster, resolve)
    except _FilesUnreachable as gone:
        return _nothing_left_to_pull(record, gone.reason, home)
    connection = Connection(target, runner, 60, say)
    try:
        try:
            return pull_with_reconnect(connection, record, home=home, say=say)
        except UnsafePath as refusal:  # the job's outcome was recorded all the same: say it too
            refusal.message = f"run {run_id}: job {load_record(run_id, home).status_text()}; {refusal.message}"
            raise
        except RunDirectoryGone as exc:
            return _nothing_left_to_pull(load_record(run_id, home), exc.message, home)
        except InstanceGone as exc:  # found terminated while reconnecting
            return _nothing_left_to_pull(load_record(run_id, home), _gone_reason(record.cluster, exc), home)
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def _outcome_from_durable_copy(record: RunRecord, home: Path | None) -> RunRecord:
    """A run whose instance went before its outcome was seen here: the exit code its durable copy names."""
    if record.durable is None or record.finished:
        return record
    exit_code = durable_fallback.read_exit_code(record.durable)
    if exit_code is None:
        return record
    record = record.with_status(RunStatus.of_exit_code(exit_code), lost_reason=None)
    save_record(record, home)
    return record


def _print_durable_log(record: RunRecord, out: BinaryIO, say: Say) -> bool:
    """The run's log as last uploaded to its durable copy in S3 (the instance is gone); False without one."""
    if record.durable is None:
        return False
    data = durable_fallback.read_log(record.durable)
    if data is None:
        return False
    say(f"run {record.run_id}: its instance is gone; the log as last uploaded to {record.durable.url}")
    out.write(data)
    out.flush()
    return True


def _nothing_left_to_pull(record: RunRecord, reason: str, home: Path | None) -> tuple[RunRecord, PullReport]:
    if record.durable is not None and not holds_everything(record):  # the instance is gone: its S3 copy
        record = _outcome_from_durable_copy(record, home)
        fetched, unchanged = durable_fallback.pull_outputs(record.durable, Path(record.local_dir))
        return record, PullReport(local_dir=Path(record.local_dir), fetched=tuple(fetched), unchanged=tuple(unchanged))
    if not holds_everything(record):
        raise _missing(record, reason, home)
    assert record.pulled is not None  # holds_everything says so
    return record, PullReport(local_dir=Path(record.local_dir), unchanged=tuple(f.path for f in record.pulled.files))


def stop(
    run_id: str,
    *,
    grace_seconds: float = STOP_GRACE_SECONDS,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
) -> tuple[RunRecord, StopOutcome]:
    LOG_NAME,
    READ_CHUNK,
    STOP_GRACE_SECONDS,
    record = load_record(run_id, home)
    if record.finished:
        return record, StopOutcome.FINISHED
    try:
        _target, runner = _connect(record.cluster, resolve)
    except _FilesUnreachable as gone:
        if record.status is not RunState.LOST or not record.lost_reason:  # the first reason found stays
            record = replace(record, status=RunState.LOST, lost_reason=gone.reason)
            save_record(record, home)
        return record, StopOutcome.GONE
    liveness = None
    if record.workers:  # every other node's job too, at the same time as the chief's
        others = [worker.index for worker in record.workers if worker.index != 0]
        stopping = threading.Thread(
            target=workers.stop_nodes, args=(_target, record), kwargs={"grace_seconds": grace_seconds, "only": others}
        )
        stopping.start()
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
        if record.workers:
            stopping.join()
    if exit_code is not None and record.workers:  # the run's status is all its nodes'
        status = workers.derive_status(workers.node_reports(_target, record))
    if exit_code is not None:
        record = record.with_status(status, ended_at=iso(utc_now()),
                                    failure=status.note if status.state is RunState.FAILED else None)
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
        target, runner = _connect(cluster_name, resolve)
    except _FilesUnreachable as gone:  # the cluster or its instance is gone: so are its runs
        return _mark_lost(pending, home, gone.reason)
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
        if record.workers:  # a multi-node run: one status derived from all its nodes
            status = workers.derive_status(workers.node_reports(target, record))
        if status != record.run_status or (status.state is RunState.FAILED and status.note != record.failure):
            reason = "no exit code and no live job" if status.state is RunState.LOST else None
            reason = status.note if status.state is RunState.LOST and status.note else reason
            save_record(record.with_status(status, lost_reason=reason,
                                           interruption=interruption_text(report.get("interruption")),
                                           failure=status.note if status.state is RunState.FAILED else None), home)
        statuses[record.run_id] = status
    return statuses


def _mark_lost(pending: list[RunRecord], home: Path | None, reason: str) -> dict[str, RunStatus]:
    for record in pending:
        if record.status is not RunState.LOST or not record.lost_reason:  # the first reason found stays
            save_record(replace(record, status=RunState.LOST, lost_reason=reason), home)
    return {record.run_id: RunStatus(RunState.LOST) for record in pending}
