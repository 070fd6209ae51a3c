"""``gpuflow run --recover`` (and ``gpuflow resume RUN --on|--up``): a run that outlives its instances.

The run is followed as ``gpuflow run`` follows it (:func:`follow_to_outcome`).
When its instance is interrupted — the job saved a checkpoint and exited 75
after a spot notice, or the instance was terminated under it — the cluster's
node is relaunched (:func:`gpuflow.clusters.relaunch.relaunch`: same type in
another zone, fallback types, on-demand with ``--spot-fallback``), the project
and data are synced again and the same command starts as attempt n+1 of the
SAME run id (same record, same run directory name; the durable store restores
its latest committed checkpoint on the new node before the job starts).  The
job's output continues in the one stream (and the one ``job.log``: what was
streamed so far is put on the new node first, the supervisor appends); each
step is said on stderr.

A job failing on its own (exit code other than 0 and 75) is not started again
unless its code is in ``restart_on_exit_codes`` (then on the same node while it
lives).  A job stopped by Ctrl-C or ``gpuflow stop`` (exit 75 without a spot
notice, on a live instance) stays stopped.  ``max_restarts`` bounds the
restarts; ``max_dollars`` stops the run (SIGTERM: it saves and exits 75)
before the estimated cost of all its attempts would pass it.  Every attempt is
recorded (:class:`~gpuflow.jobs.records.Attempt`) in the run's record and
manifest.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from gpuflow.clusters.relaunch import relaunch
from gpuflow.config import RecoverySettings
from gpuflow.durable import uploader
from gpuflow.errors import GpuflowError, InstanceGone, JobFailed, JobInterrupted, RunLost, UsageError
from gpuflow.jobs.connection import Connection, instance_gone
from gpuflow.jobs.follow import LIVENESS_INTERVAL
from gpuflow.jobs.foreground import follow_to_outcome
from gpuflow.jobs.manifest import with_attempts
from gpuflow.jobs.records import (
    INTERRUPTED_EXIT_CODE,
    LOG_NAME,
    MANIFEST_NAME,
    STOP_GRACE_SECONDS,
    Attempt,
    AttemptEnd,
    Checkpoint,
    InterruptChoice,
    RunOutcome,
    RunRecord,
    RunState,
    RunTarget,
    Say,
    iso,
    load_record,
    new_run_id,
    quiet,
    save_record,
    utc_now,
)
from gpuflow.jobs.resume import _start_again
from gpuflow.jobs.rundir import run_status, stop_job
from gpuflow.jobs.start import start_run, wait_for_start
from gpuflow.jobs.targets import TargetResolver
from gpuflow.state import atomic_write_json, validate_name

DEFAULT_MAX_RESTARTS = 5
# --max-dollars stops a run this long before its estimate would pass the cap: time for the
# job to save its checkpoint and exit after SIGTERM, billed all the same.
BUDGET_MARGIN_SECONDS = 30.0
BUDGET_CHECK_SECONDS = 1.0
_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+")


@dataclass(frozen=True)
class RecoveryPolicy:
    """How ``run --recover`` continues a run (command line over gpuflow.toml over these defaults)."""

    max_restarts: int = DEFAULT_MAX_RESTARTS
    fallback_types: tuple[str, ...] = ()
    restart_on_exit_codes: frozenset[int] = frozenset()
    max_dollars: float | None = None


def recovery_policy(
    settings: RecoverySettings | None = None,
    *,
    recover: bool | None = None,
    max_restarts: int | None = None,
    fallback_types: str | None = None,
    restart_on_exit_codes: str | None = None,
    max_dollars: float | None = None,
) -> RecoveryPolicy | None:
    """The policy the options and the project's settings ask for; None when recovery is off.
    An option that needs recovery while it is off, or a bad value, is a :class:`UsageError`."""
    settings = settings or RecoverySettings()
    on = recover if recover is not None else bool(settings.recover)
    given = {
        "--max-restarts": max_restarts, "--fallback-types": fallback_types,
        "--restart-on-exit-codes": restart_on_exit_codes, "--max-dollars": max_dollars,
    }
    if not on:
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise UsageError(f"{', '.join(named)} need --recover", hint="add --recover (or `recover = true` in gpuflow.toml)")
        return None
    restarts = max_restarts if max_restarts is not None else settings.max_restarts
    if restarts is not None and restarts < 0:
        raise UsageError(f"--max-restarts must be 0 or more, got {restarts}")
    types = _listed(fallback_types if fallback_types is not None else settings.fallback_types)
    for kind in types:
        if not _INSTANCE_TYPE.fullmatch(kind):
            raise UsageError(f"--fallback-types: {kind!r} is not an instance type", hint="e.g. --fallback-types g6.xlarge,g4dn.xlarge")
    codes: set[int] = set()
    for item in _listed(restart_on_exit_codes if restart_on_exit_codes is not None else settings.restart_on_exit_codes):
        if not item.isdigit() or not 1 <= int(item) <= 255 or int(item) == INTERRUPTED_EXIT_CODE:
            raise UsageError(
                f"--restart-on-exit-codes: {item!r} is not an exit code from 1 to 255 other than 75",
                hint="75 (interrupted, with a checkpoint) is always recovered; e.g. --restart-on-exit-codes 1,137",
            )
        codes.add(int(item))
    dollars = max_dollars if max_dollars is not None else settings.max_dollars
    if dollars is not None and not dollars > 0:
        raise UsageError(f"--max-dollars must be more than 0, got {dollars:g}")
    return RecoveryPolicy(
        max_restarts=DEFAULT_MAX_RESTARTS if restarts is None else restarts,
        fallback_types=types, restart_on_exit_codes=frozenset(codes), max_dollars=dollars,
    )


def _listed(text: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item.strip() for item in (text or "").split(",") if item.strip()))


class _KeptStream:
    """The job's output as streamed to ``out``, also kept (spooled to disk past 8 MiB): what a
    new node's ``job.log`` starts with, so the run's log stays one log."""

    def __init__(self, out: BinaryIO, start: bytes = b"") -> None:
        self.out = out
        self.kept = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        self.kept.write(start)

    def write(self, data: bytes) -> int:
        self.kept.write(data)
        return self.out.write(data) or len(data)

    def flush(self) -> None:
        self.out.flush()

    def contents(self) -> bytes:
        self.kept.seek(0)
        data = self.kept.read()
        self.kept.seek(0, 2)
        return data


class _BudgetGuard:
    """Stops the job (SIGTERM: save and exit 75) once the run's estimated cost, its earlier
    attempts' plus this one's so far and :data:`BUDGET_MARGIN_SECONDS`, reaches ``cap``."""

    def __init__(self, target: RunTarget, remote_dir: str, *, spent: float, price: float, cap: float,
                 started: datetime.datetime, say: Say, run_id: str) -> None:
        self.target, self.remote_dir, self.spent, self.price, self.cap = target, remote_dir, spent, price, cap
        self.started, self.say, self.run_id = started, say, run_id
        self.stopped = False
        self.estimate = spent
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpuflow-budget", daemon=True)
        self._thread.start()

    def _projected(self) -> float:
        seconds = (utc_now() - self.started).total_seconds() + BUDGET_MARGIN_SECONDS
        return self.spent + self.price * seconds / 3600

    def _watch(self) -> None:
        while not self._done.is_set():
            projected = self._projected()
            if projected >= self.cap:
                self.stopped = True
                self.estimate = projected
                self.say(
                    f"run {self.run_id}: stopping it (it saves a checkpoint first): its estimated cost "
                    f"${projected:.4f} would pass --max-dollars {self.cap:g}"
                )
                runner = None
                try:
                    runner = self.target.connect()
                    stop_job(runner, self.remote_dir, grace_seconds=STOP_GRACE_SECONDS)
                except (GpuflowError, OSError) as exc:
                    self.say(f"run {self.run_id}: could not stop it for the budget: {exc}")
                finally:
                    if runner is not None:
                        with contextlib.suppress(Exception):
                            runner.close()
                return
            self._done.wait(BUDGET_CHECK_SECONDS)

    def close(self) -> None:
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_GRACE_SECONDS + 30)


def attempts_cost(attempts: Sequence[Attempt]) -> float:
    """What the ended attempts cost (unknown prices count 0)."""
    return round(sum(attempt.cost_usd or 0.0 for attempt in attempts), 6)


def _open_attempt(number: int, target: RunTarget) -> Attempt:
    cluster = target.cluster
    node = cluster.nodes[0] if cluster.nodes else None
    return Attempt(
        number=number, instance_id=node.instance_id if node else None, instance_type=cluster.instance_type,
        availability_zone=node.availability_zone if node else None, market=node.lifecycle if node else "on-demand",
        price_per_hour=cluster.price_per_hour, started_at=iso(utc_now()),
    )


def _close_attempt(attempt: Attempt, ended: AttemptEnd, exit_code: int | None) -> Attempt:
    now = utc_now()
    seconds = max(0.0, (now - datetime.datetime.fromisoformat(attempt.started_at)).total_seconds())
    cost = None if attempt.price_per_hour is None else round(attempt.price_per_hour * seconds / 3600, 6)
    return replace(attempt, ended_at=iso(now), ended=ended, exit_code=exit_code, cost_usd=cost)


def _record_attempts(run_id: str, attempts: Sequence[Attempt], home: Path | None) -> RunRecord:
    """The run's record and its pulled manifest (when there is one) with ``attempts``."""
    record = replace(load_record(run_id, home), attempts=tuple(attempts))
    save_record(record, home)
    manifest_path = Path(record.local_dir) / MANIFEST_NAME
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(manifest_path.read_text())
        if isinstance(manifest, dict):
            atomic_write_json(manifest_path, with_attempts(manifest, tuple(attempts)), mode=0o644)
    return record


Relauncher = Callable[..., Any]


def _default_relauncher(cluster_name: str, **options: Any) -> Any:
    return relaunch(cluster_name, **options)


def run_with_recovery(
    cluster_name: str,
    *,
    resolve: TargetResolver,
    policy: RecoveryPolicy,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    out: BinaryIO,
    on_interrupt: Callable[[RunRecord], InterruptChoice] | None = None,
    home: Path | None = None,
    say: Say = quiet,
    run_id: str | None = None,
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    heartbeat_seconds: float = 30,
    poll_interval: float = 0.5,
    reconnect_timeout: float = 300,
    liveness_interval: float = LIVENESS_INTERVAL,
    previous: RunRecord | None = None,
    relauncher: Relauncher = _default_relauncher,
    detach: bool = False,
) -> RunOutcome:
    """``gpuflow run --recover`` on cluster ``cluster_name`` (see the module's docstring).
    ``previous``: the record of an earlier run this continues as its next attempt
    (``gpuflow resume RUN --on|--up``): same run id, its log first, its attempts kept."""
    if detach:
        raise UsageError("--recover follows the run to restart it: it cannot --detach", hint="drop --detach")
    start_log = b""
    if previous is not None:
        run_id = previous.run_id
        with contextlib.suppress(OSError):
            start_log = (Path(previous.local_dir) / LOG_NAME).read_bytes()
    run_id = validate_name(run_id or new_run_id(), "run id")
    stream = _KeptStream(out, start_log)
    attempts: list[Attempt] = list(previous.attempts) if previous is not None else []
    if previous is not None and not attempts:  # started without --recover: its one attempt, as far as known
        attempts.append(Attempt(
            number=1, instance_id=None, instance_type="", availability_zone=None, market="", price_per_hour=None,
            started_at=previous.started_at, ended_at=previous.ended_at, ended=_END_OF_STATE.get(previous.status, AttemptEnd.LOST),
            exit_code=previous.exit_code,
        ))
    first_started = previous.started_at if previous is not None else None
    stopped_by_user: list[bool] = []

    def interrupt(record: RunRecord) -> InterruptChoice:
        choice = InterruptChoice(on_interrupt(record) if on_interrupt is not None else InterruptChoice.DETACH)
        if choice is InterruptChoice.STOP:
            stopped_by_user.append(True)
        return choice

    target = resolve(cluster_name)
    in_place = False
    restarts = 0
    while True:
        attempt = _open_attempt(len(attempts) + 1, target)
        if policy.max_dollars is not None and attempt.price_per_hour is None:
            raise UsageError(
                f"--max-dollars needs the price of {target.cluster.instance_type}, and it is unknown",
                hint="drop --max-dollars, or use an instance type of the price table",
            )
        attempts.append(attempt)
        connection = Connection(target, target.connect(), reconnect_timeout, say)
        guard: _BudgetGuard | None = None
        record: RunRecord | None = None
        gone: str | None = None
        try:
            remote_dir = f"{connection.runner.base_dir}/runs/{run_id}"
            if not in_place and run_status(connection.runner, remote_dir)[remote_dir].get("exists"):
                in_place = True  # the run's directory is on this node already (`resume RUN --on` its own cluster)
            if in_place:
                record = replace(
                    load_record(run_id, home), cluster=target.cluster.name, base_dir=connection.runner.base_dir,
                    remote_dir=remote_dir,
                )
                _moved, offset = _start_again(connection.runner, record)  # offset: the node's log so far
                record = replace(
                    record, status=RunState.RUNNING, exit_code=None, ended_at=None, lost_reason=None,
                    checkpoint=None, interruption=None, attempts=tuple(attempts),
                )
                save_record(record, home)
                wait_for_start(connection.runner, record.remote_dir)
            else:
                start_log = stream.contents()
                if start_log:  # one log: the supervisor appends to what the run printed before
                    connection.runner.put_bytes(start_log, f"{connection.runner.base_dir}/runs/{run_id}/{LOG_NAME}")
                if len(attempts) > 1:  # the durable sidecar names its commits with the attempt they belong to
                    connection.runner.put_bytes(
                        json.dumps({"attempt": len(attempts)}).encode(),
                        f"{connection.runner.base_dir}/runs/{run_id}/{uploader.ATTEMPT_FILE}",
                    )
                record = start_run(
                    target, connection.runner, project_dir=project_dir, module=module, args=args, run_id=run_id,
                    data_dir=data_dir, heartbeat_seconds=heartbeat_seconds, home=home, say=say, env=env,
                )
                offset = len(start_log)
                keep = previous if previous is not None and len(attempts) == len(previous.attempts) + 1 else None
                record = replace(
                    record, started_at=first_started or record.started_at, attempts=tuple(attempts),
                    resumes=keep.resumes if keep is not None else record.resumes,
                )
                first_started = record.started_at
                save_record(record, home)
            if len(attempts) > 1:
                say(f"run {run_id}: {_resumed_at(connection, record)}")
            if policy.max_dollars is not None and attempt.price_per_hour is not None:
                guard = _BudgetGuard(
                    target, record.remote_dir, spent=attempts_cost(attempts[:-1]), price=attempt.price_per_hour,
                    cap=policy.max_dollars, started=datetime.datetime.fromisoformat(attempt.started_at), say=say,
                    run_id=run_id,
                )
            outcome = follow_to_outcome(
                connection, record, out=stream, offset=offset, on_interrupt=interrupt, home=home, say=say,  # type: ignore[arg-type]
                poll_interval=poll_interval, liveness_interval=liveness_interval,
            )
        except JobInterrupted as exc:
            failure: GpuflowError = exc
            code: int | None = INTERRUPTED_EXIT_CODE
            record = load_record(run_id, home)
            gone = instance_gone(target)
            if guard is not None and guard.stopped:
                why = AttemptEnd.BUDGET
                total = attempts_cost([*attempts[:-1], _close_attempt(attempts[-1], why, code)])
                exc.message = (
                    f"run {run_id} stopped before its estimated cost would pass --max-dollars "
                    f"{policy.max_dollars:g} (${total:.4f} spent over {len(attempts)} attempt(s)); "
                    f"{record.status_text()}"
                )
                exc.hint = f"continue it with `gpuflow resume {run_id}`; what was pulled is in {record.local_dir}"
            elif stopped_by_user or (record.interruption is None and gone is None):
                why = AttemptEnd.STOPPED  # Ctrl-C, or `gpuflow stop`: stays stopped
            else:
                why = AttemptEnd.INTERRUPTED
        except JobFailed as exc:
            failure, code, why = exc, exc.exit_code, AttemptEnd.FAILED
            if guard is not None and guard.stopped:  # it did not save in time after the budget's SIGTERM
                why = AttemptEnd.BUDGET
                exc.message = f"{exc.message}, after gpuflow stopped it for --max-dollars {policy.max_dollars:g}"
            elif not stopped_by_user and load_record(run_id, home).interruption is not None:
                # The spot notice's SIGTERM ended it before it could save (it had not yet set up
                # its handler, or it does not save): its instance is going away all the same, so
                # this is an interruption, restarted from the last committed checkpoint.
                why = AttemptEnd.INTERRUPTED
        except (RunLost, InstanceGone) as exc:
            failure, code = exc, None
            gone = instance_gone(target)
            why = AttemptEnd.INSTANCE_GONE if gone is not None else AttemptEnd.LOST
        except BaseException:
            attempts[-1] = _close_attempt(attempts[-1], AttemptEnd.GPUFLOW, None)
            with contextlib.suppress(Exception):
                _record_attempts(run_id, attempts, home)
            raise
        else:
            if outcome.detached:  # Ctrl-C answered "detach": the attempt goes on without us
                _record_attempts(run_id, attempts, home)
                return outcome
            attempts[-1] = _close_attempt(attempts[-1], AttemptEnd.SUCCEEDED, 0)
            record = _record_attempts(run_id, attempts, home)
            if len(attempts) > 1:
                say(f"run {run_id} succeeded after {len(attempts)} attempts (${attempts_cost(attempts):.4f} estimated in all)")
            return replace(outcome, record=record)
        finally:
            if guard is not None:
                guard.close()
            with contextlib.suppress(Exception):
                connection.runner.close()

        attempts[-1] = _close_attempt(attempts[-1], why, code)
        record = _record_attempts(run_id, attempts, home)
        restartable = why in (AttemptEnd.INTERRUPTED, AttemptEnd.INSTANCE_GONE) or (
            why is AttemptEnd.FAILED and code in policy.restart_on_exit_codes
        )
        if not restartable:
            raise failure
        if restarts >= policy.max_restarts:
            failure.message = f"{failure.message}; not restarted: --max-restarts {policy.max_restarts} reached"
            raise failure
        if policy.max_dollars is not None and attempts_cost(attempts) >= policy.max_dollars:
            failure.message = (
                f"{failure.message}; not restarted: ${attempts_cost(attempts):.4f} spent reaches --max-dollars {policy.max_dollars:g}"
            )
            raise failure
        restarts += 1
        what = _what_happened(why, code, record, gone)
        if why is AttemptEnd.FAILED and instance_gone(target) is None:
            say(f"run {run_id}: {what}; restarting it on the same node as attempt {len(attempts) + 1}")
            in_place = True
            continue
        node = target.cluster.nodes[0] if target.cluster.nodes else None
        say(
            f"run {run_id}: {what}; relaunching a {target.cluster.instance_type} node"
            f"{' outside ' + node.availability_zone if node and node.availability_zone else ''} "
            f"for attempt {len(attempts) + 1} (restart {restarts} of at most {policy.max_restarts}) …"
        )
        replacement = relauncher(
            cluster_name, fallback_types=policy.fallback_types,
            avoid_zone=node.availability_zone if node else None, progress=say,
        )
        say(
            f"run {run_id}: relaunched in {replacement.availability_zone}: {replacement.instance_id} "
            f"({replacement.instance_type}, {replacement.market})"
        )
        target = resolve(cluster_name)
        in_place = False


_END_OF_STATE = {RunState.FAILED: AttemptEnd.FAILED, RunState.INTERRUPTED: AttemptEnd.INTERRUPTED, RunState.LOST: AttemptEnd.LOST}


def _what_happened(why: AttemptEnd, code: int | None, record: RunRecord, gone: str | None) -> str:
    if why is AttemptEnd.INTERRUPTED:
        where = f" at {record.checkpoint}" if record.checkpoint else ""
        notice = f" ({record.interruption})" if record.interruption else ""
        return f"interrupted{where}{notice}"
    if why is AttemptEnd.INSTANCE_GONE:
        return f"interrupted: {gone or 'its instance is gone'}"
    return f"failed with exit code {code} (listed in --restart-on-exit-codes)"


def _resumed_at(connection: Connection, record: RunRecord) -> str:
    """What the new attempt starts from: the checkpoint in its run directory, if any."""
    try:
        report = run_status(connection.runner, record.remote_dir)[record.remote_dir]
        checkpoint = Checkpoint.parse(report.get("checkpoint"))
    except (GpuflowError, OSError, ValueError, KeyError):
        checkpoint = None
    if checkpoint is not None:
        return f"resumed at {checkpoint}"
    return "started again (no checkpoint in its run directory when it started: its job restores its own, or starts over)"

