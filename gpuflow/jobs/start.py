"""Starting a run: sync the project (and data), prepare its environment, write its supervisor and manifest, launch it detached."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gpuflow import sync
from gpuflow.clusters.owner import owner_id
from gpuflow.durable import fallback as durable_fallback
from gpuflow.durable import locate, uploader
from gpuflow.durable.ref import DurableRef
from gpuflow.errors import GpuflowError, InstanceGone, RemoteCommandFailed, UnreachableHost, UsageError
from gpuflow.jobs import scripts
from gpuflow.jobs.environment import build_job_argv, is_training_module, prepare_environment, ship_package
from gpuflow.jobs.manifest import build_manifest
from gpuflow.jobs.records import (
    MANIFEST_NAME,
    OUTPUTS_NAME,
    PID_NAME,
    SUPERVISOR_NAME,
    TRAINING_PACKAGE,
    RunRecord,
    RunState,
    RunTarget,
    Say,
    iso,
    new_run_id,
    quiet,
    save_record,
    utc_now,
)
from gpuflow.jobs.rundir import read_exit_code, read_small
from gpuflow.records import CommandResult
from gpuflow.state import validate_name
from gpuflow.transport.base import CommandRunner, quote_argv


# Variables gpuflow sets for every job itself (PYTHONPATH when it ships the training package).
def parse_job_env(items: Sequence[str]) -> dict[str, str]:
    """``run --env KEY=VALUE`` (repeatable) as the job's extra environment, checked by
    :func:`checked_job_env`; a bad item is a :class:`UsageError` (nothing is started)."""
    env: dict[str, str] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE", hint="e.g. --env TF_CPP_MIN_LOG_LEVEL=3")
        try:
            env.update(checked_job_env({key: value}))
        except UsageError as exc:
            raise UsageError(f"--env {item!r}: {exc.message}", hint=exc.hint) from exc
    return env


def start_run(
    target: RunTarget,
    runner: CommandRunner,
    *,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    run_id: str | None = None,
    data_dir: Path | None = None,
    heartbeat_seconds: float = 30,
    home: Path | None = None,
    say: Say = quiet,
    env: Mapping[str, str] | None = None,
) -> RunRecord:
    """Sync, prepare the environment, write the manifest and start the job detached.

    ``data_dir`` (``gpuflow run --data``) is pushed to ``<base>/data/<basename>/``
    first — only what changed, so later runs reuse it — and named to the job
    in ``$GPUFLOW_DATA_DIR`` (and ``--data-dir`` for a training module).

    ``env`` adds variables to the job's environment (e.g. ``GPUFLOW_SMOKE=1``);
    gpuflow's own ``GPUFLOW_*`` run variables and AWS credentials cannot be set this way.

    On one node: a run on several is :func:`gpuflow.jobs.workers.start`'s.

    Returns once the supervisor has recorded the job's pid (or its exit
    code, for a job that ended at once).
    """
    extra_env = checked_job_env(env)
    project_dir = project_dir.resolve()
    run_id = validate_name(run_id or new_run_id(), "run id")
    base_dir = runner.base_dir
    remote_dir = f"{base_dir}/runs/{run_id}"
    python, remote_data_dir = prepare_node(
        runner, target.cluster.name, target.sync_project, target.sync_data, project_dir, data_dir, say
    )
    argv, job_env = job_setup(runner, module, args, run_id, remote_dir, python, remote_data_dir, extra_env, project_dir)
    durable = _durable_for(target, run_id)
    record = RunRecord(
        run_id=run_id,
        cluster=target.cluster.name,
        base_dir=base_dir,
        remote_dir=remote_dir,
        command=tuple(argv),
        project_dir=str(project_dir),
        local_dir=str(project_dir / "runs" / run_id),
        started_at=iso(utc_now()),
        module=module,
        args=tuple(str(arg) for arg in args),
        job_env=dict(extra_env) or None,
        data_dir=str(data_dir) if data_dir is not None else None,
        durable=durable.ref if durable else None,
    )
    supervisor = supervisor_file(runner, record, argv, job_env, python, heartbeat_seconds,
                                 durable_endpoint=durable.endpoint if durable else "")
    manifest = build_manifest(record=record, cluster=target.cluster, project_dir=project_dir, environment={})
    manifest_file = (MANIFEST_NAME, json.dumps(manifest, indent=2).encode(), 0o644)
    save_record(record, home)
    try:  # one round trip: the files, the launch, and the wait for the job's pid
        launch_and_wait(runner, remote_dir, timeout=START_SECONDS + (uploader.RESTORE_SECONDS if durable else 0),
                        files=(supervisor, manifest_file), python=python)
    except GpuflowError as exc:  # the record must not say 'running' for a job nobody saw start
        save_record(replace(record, status=RunState.LOST, lost_reason=f"its job was not seen to start: {exc.message}"), home)
        raise
    say(f"run {run_id} started on {target.cluster.name}: {quote_argv(argv)}")
    return record


def prepare_node(
    runner: CommandRunner,
    where: str,
    sync_project: Callable[[Path], object] | None,
    sync_data: Callable[[Path], object] | None,
    project_dir: Path,
    data_dir: Path | None,
    say: Say,
) -> tuple[str, str | None]:
    """Sync the project (and ``data_dir``) to one node and prepare its environment:
    its job's interpreter, and where the data directory is there (None: no data)."""
    base_dir = runner.base_dir
    if sync_project is not None:
        say(f"syncing {project_dir} to {where}")
        report = sync_project(project_dir)
        summary = getattr(report, "summary", None)
        if callable(summary):
            say(str(summary()))
    remote_data_dir = None
    if data_dir is not None:
        if sync_data is None:
            raise UsageError("this target cannot receive a data directory")
        say(f"syncing data {data_dir} to {where}")
        report = sync_data(Path(data_dir))
        summary = getattr(report, "summary", None)
        if callable(summary):
            say(str(summary()))
        remote_data_dir = f"{base_dir}/data/{sync.data_name(Path(data_dir))}"
    return prepare_environment(runner, project_dir, say=say), remote_data_dir


def job_setup(
    runner: CommandRunner,
    module: str | None,
    args: Sequence[str],
    run_id: str,
    remote_dir: str,
    python: str,
    remote_data_dir: str | None,
    extra_env: Mapping[str, str],
    project_dir: Path,
) -> tuple[list[str], dict[str, str]]:
    """The job's argv and environment in ``remote_dir`` on one node (the training package shipped when needed)."""
    base_dir = runner.base_dir
    job_env = {
        "GPUFLOW_RUN_ID": run_id,
        "GPUFLOW_RUN_DIR": remote_dir,
        "GPUFLOW_OUTPUT_DIR": f"{remote_dir}/{OUTPUTS_NAME}",
        "GPUFLOW_DATA_ROOT": f"{base_dir}/data",  # where `gpuflow sync --data` puts data directories
        "PYTHONUNBUFFERED": "1",
    }
    if remote_data_dir is not None:
        job_env["GPUFLOW_DATA_DIR"] = remote_data_dir
    job_env = {**extra_env, **job_env}  # gpuflow's own variables win (and are refused in env anyway)
    if is_training_module(module) and not (project_dir / TRAINING_PACKAGE / "__init__.py").is_file():
        # `gpuflow run training.cifar10_cnn` from any directory: ship the installed package.
        site_dir = f"{remote_dir}/site"
        ship_package(runner, TRAINING_PACKAGE, site_dir)
        job_env["PYTHONPATH"] = site_dir
    argv = build_job_argv(
        python=python, module=module, args=args, output_dir=f"{remote_dir}/{OUTPUTS_NAME}", data_dir=remote_data_dir
    )
    return argv, job_env


def write_supervisor(
    runner: CommandRunner,
    record: RunRecord,
    argv: Sequence[str],
    job_env: Mapping[str, str],
    python: str,
    heartbeat_seconds: float,
    remote_dir: str | None = None,
    durable_endpoint: str = "",
) -> None:
    """The run's supervisor script, in ``remote_dir`` (default: the record's) of ``runner``'s node;
    with the record's ``durable`` store its sidecar restores and uploads (``durable_endpoint``:
    the S3 endpoint, "" = AWS's own)."""
    name, script, mode = supervisor_file(runner, record, argv, job_env, python, heartbeat_seconds, remote_dir,
                                         durable_endpoint)
    runner.put_bytes(script, f"{remote_dir or record.remote_dir}/{name}", mode=mode)


def supervisor_file(
    runner: CommandRunner,
    record: RunRecord,
    argv: Sequence[str],
    job_env: Mapping[str, str],
    python: str,
    heartbeat_seconds: float,
    remote_dir: str | None = None,
    durable_endpoint: str = "",
) -> tuple[str, bytes, int]:
    """The run's supervisor script as a run-directory file (name, bytes, mode): see :func:`write_supervisor`."""
    remote_dir = remote_dir or record.remote_dir
    script = scripts.render_supervisor(
        run_id=record.run_id,
        run_dir=remote_dir,
        base_dir=runner.base_dir,
        work_dir=f"{runner.base_dir}/project",
        argv=argv,
        env=job_env,
        heartbeat_seconds=heartbeat_seconds,
        probe_python=python,
        durable_url=record.durable.url if record.durable else "",
        durable_region=record.durable.region if record.durable else "",
        durable_endpoint=durable_endpoint,
    )
    return SUPERVISOR_NAME, script.encode(), 0o755


# How long a start waits for the job's pid (a durable run's restore comes on top).
START_SECONDS = 30.0


def launch_and_wait(
    runner: CommandRunner,
    remote_dir: str,
    timeout: float = START_SECONDS,
    *,
    files: Sequence[tuple[str, bytes, int]] = (),
    python: str | None = None,
) -> None:
    """One round trip (:func:`gpuflow.jobs.scripts.start_script`): write ``files`` (name, bytes, mode;
    carried on stdin, unpacked with ``python``, default the runner's) into ``remote_dir``, start the
    supervisor, and wait on the target, woken by the event, until the job has its pid or an exit code."""
    script = scripts.start_script(
        run_dir=remote_dir, python=python or runner.python, with_files=bool(files), script_name=SUPERVISOR_NAME,
        timeout_seconds=timeout,
    )
    launched = _launch(runner, script, stdin=scripts.start_files_payload(files) if files else None,
                       timeout=timeout + 90)
    if not launched.ok:
        raise RemoteCommandFailed(
            f"could not start the job supervisor: {launched.stderr.decode(errors='replace').strip()[-300:]}",
            hint="the instance needs bash, setsid (util-linux) and nohup",
        )
    if started_from_answer(launched.stdout) is None:
        raise RemoteCommandFailed(
            f"the job supervisor did not start within {timeout:g}s",
            hint=f"look at {remote_dir} on the instance (setsid, bash and python3 must exist there)",
        )


@dataclass(frozen=True)
class Started:
    """What a start's answer says: the job's pid, or its exit code when it ended at once (either may be None)."""

    pid: int | None
    exit_code: int | None


def started_from_answer(stdout: bytes) -> Started | None:
    """The last ``gpuflow-start: pid PID exit CODE`` line of a start's output; None when the job
    has neither a pid nor an exit code (it was not seen to start)."""
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        if line.startswith("gpuflow-start: pid "):
            fields = line.split()  # ['gpuflow-start:', 'pid', PID?, 'exit', CODE?]
            at = fields.index("exit")
            pid = _int_or_none(fields[2:at])
            code = _int_or_none(fields[at + 1:])
            return Started(pid, code) if pid is not None or code is not None else None
    return None


def _int_or_none(fields: Sequence[str]) -> int | None:
    try:
        return int(fields[0]) if len(fields) == 1 else None
    except ValueError:
        return None


@dataclass(frozen=True)
class _Durable:
    ref: DurableRef
    endpoint: str  # "" = AWS's own S3 endpoint of the region


def _durable_for(target: RunTarget, run_id: str) -> _Durable | None:
    """Where the run's checkpoints, log and outputs are kept in S3: the account stack's bucket
    in the cluster's region (None without the stack: nothing is durable).  A sandbox run's
    sidecar uses the sandbox's loopback S3; where no other process can reach it (gpuflow's
    in-process mock) the run is not durable rather than pointed anywhere else."""
    store = locate.store_for(target.cluster)
    if store is None:
        return None
    ref = DurableRef.for_run(store, owner_id(), run_id, sandbox=target.cluster.sandbox, profile=target.cluster.profile)
    endpoint = os.environ.get(uploader.S3_ENDPOINT_VARIABLE, "")
    if target.cluster.sandbox and not endpoint:
        endpoint = durable_fallback.sandbox_endpoint() or ""
        if not endpoint:
            return None
    return _Durable(ref, endpoint)


# Set by gpuflow for every job (start_run); a caller's ``env`` cannot replace them.
RESERVED_JOB_VARIABLES = frozenset(
    {"GPUFLOW_RUN_ID", "GPUFLOW_RUN_DIR", "GPUFLOW_OUTPUT_DIR", "GPUFLOW_DATA_ROOT", "GPUFLOW_DATA_DIR", "PYTHONPATH",
     "PYTHONUNBUFFERED", "GPUFLOW_NUM_WORKERS", "GPUFLOW_WORKER_INDEX"}
)


def checked_job_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` for a job, checked: names a shell accepts, string values, none of
    gpuflow's own run variables and no AWS variable but the region (UsageError)."""
    checked: dict[str, str] = {}
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not key or not key.replace("_", "a").isalnum() or not key.isascii() or key[0].isdigit():
            raise UsageError(f"invalid environment variable name {key!r}", hint="use letters, digits and _")
        if key in RESERVED_JOB_VARIABLES:
            raise UsageError(f"{key} is set by gpuflow for every job", hint="drop it from the job's environment")
        if key.startswith("AWS_") and key not in scripts.KEPT_AWS_VARIABLES:
            raise UsageError(f"{key} is never handed to a job", hint="jobs get no AWS credentials")
        if not isinstance(value, str) or "\0" in value:
            raise UsageError(f"the value of {key} must be a string without NUL bytes, got {value!r}")
        checked[key] = value
    return checked


def _launch(
    runner: CommandRunner, launch: str, attempts: int = 3, *, stdin: bytes | None = None, timeout: float = 120
) -> CommandResult:
    """Run the launch script; repeat it when the connection drops mid-command
    (safe: the files it writes are the same, and the supervisor claims the run directory,
    so a second start is a no-op)."""
    for attempt in range(1, attempts + 1):
        try:
            return runner.run_script(launch, stdin=stdin, timeout=timeout, check=False)
        except InstanceGone:
            raise
        except UnreachableHost:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def wait_for_start(runner: CommandRunner, remote_dir: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_small(runner, f"{remote_dir}/{PID_NAME}") or read_exit_code(runner, remote_dir) is not None:
            return
        time.sleep(0.05)
    raise RemoteCommandFailed(
        f"the job supervisor did not start within {timeout:g}s",
        hint=f"look at {remote_dir} on the instance (setsid, bash and python3 must exist there)",
    )
