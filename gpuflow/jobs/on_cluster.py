"""``gpuflow run`` against a named cluster: optionally launch it first (``--up``) and tear it down after (``--down``)."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from gpuflow import clusters
from gpuflow.errors import GpuflowError, JobInterrupted, NotFound, UsageError
from gpuflow.jobs.foreground import run
from gpuflow.jobs.recover import run_with_recovery
from gpuflow.jobs.records import InterruptChoice, ProcessLiveness, RunOutcome, RunRecord, RunTarget, Say, load_record, quiet
from gpuflow.jobs.rundir import run_status, stop_job
from gpuflow.jobs.targets import TargetResolver, is_known_cluster, target_for_cluster
from gpuflow.provisioner import cloud_for_one_shot_run
from gpuflow.transport.shared import shared_connections


def run_on_cluster(
    cluster_name: str,
    *,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    out: BinaryIO,
    up_spec: Any = None,
    down: bool = False,
    detach: bool = False,
    on_interrupt: Callable[[RunRecord], InterruptChoice] | None = None,
    say: Say = quiet,
    resolve: TargetResolver | None = None,
    recovery: Any = None,
    **run_options: Any,
) -> RunOutcome:
    """``gpuflow run [--up ...] [--down]``: optionally launch the cluster
    (``up_spec``, a ClusterSpec, when it does not exist yet), run, pull, and
    with ``down`` tear it down afterwards — also when the job fails, gpuflow
    fails or the user presses Ctrl-C (then the job is stopped, not detached:
    its instance is going away).  ``recovery`` (a :class:`~gpuflow.jobs.recover.RecoveryPolicy`):
    ``run --recover``, every node it relaunches torn down with the cluster."""
    if down and detach:
        raise UsageError("--down and --detach contradict each other", hint="drop one of them")
    if resolve is None:  # the cluster is reached as this project's config says (a loopback sshd)
        resolve = functools.partial(target_for_cluster, project_dir=project_dir)
    if down:
        on_interrupt = _stop_on_interrupt
    in_process = up_spec is not None and getattr(up_spec, "sandbox", False) and down and not is_known_cluster(
        cluster_name
    )
    if in_process:
        # Launch, run and tear down in one go: in the sandbox server holding the account
        # stack (the run is durable), else in this process (moto) — nothing is left behind.
        sandbox_context: Any = cloud_for_one_shot_run(up_spec.region)
    else:
        sandbox_context = contextlib.nullcontext()
    # One connection per node for everything the run does (sync, start, follow, pull), closed at the end.
    with sandbox_context, shared_connections():
        return _run_on_cluster(
            cluster_name,
            project_dir=project_dir,
            module=module,
            args=args,
            out=out,
            up_spec=up_spec,
            down=down,
            detach=detach,
            on_interrupt=on_interrupt,
            say=say,
            resolve=resolve,
            recovery=recovery,
            **run_options,
        )


def _run_on_cluster(
    cluster_name: str,
    *,
    up_spec: Any,
    down: bool,
    say: Say,
    resolve: TargetResolver,
    recovery: Any = None,
    **run_arguments: Any,
) -> RunOutcome:
    primary: BaseException | None = None
    target: RunTarget | None = None
    try:
        if up_spec is not None:
            try:
                clusters.get_cluster(cluster_name)
                say(f"cluster {cluster_name} already exists: using it")
            except NotFound:
                say(f"launching cluster {cluster_name}")
                clusters.up(up_spec)
        target = resolve(cluster_name)
        try:
            if recovery is not None:
                nodes = run_arguments.pop("nodes", None)
                if (nodes or len(target.cluster.nodes)) > 1:
                    raise UsageError(
                        "--recover continues a run on one node; this run would use "
                        f"{nodes or len(target.cluster.nodes)} nodes",
                        hint="run a multi-node job without --recover, or give --nodes 1",
                    )
                return run_with_recovery(cluster_name, resolve=resolve, policy=recovery, say=say, **run_arguments)
            return run(target, say=say, **run_arguments)
        except JobInterrupted as interrupted:
            if down:  # its cluster goes: `run --resume` cannot continue it there
                record = load_record(interrupted.run_id, run_arguments.get("home"))
                interrupted.hint = (
                    f"its checkpoint was pulled into {record.local_dir}; the cluster is torn down (--down), "
                    f"so `gpuflow run --resume` cannot continue it there: `gpuflow resume {interrupted.run_id} --up` "
                    "continues it on a new cluster"
                )
            raise
    except BaseException as exc:
        primary = exc
        raise
    finally:
        if down and not is_known_cluster(cluster_name):
            # Nothing of ours to tear down (an `up` refused the name, e.g. another owner's
            # cluster has it, or rolled back): never go looking for the name by its tags.
            say(f"no cluster {cluster_name} of this gpuflow to tear down")
        elif down:
            say(f"tearing down cluster {cluster_name}")
            # The cluster this run used, where it was made (not where the project's `sandbox` points).
            recorded_sandbox = target.cluster.sandbox if target is not None else getattr(up_spec, "sandbox", None)
            try:
                if target is not None and recovery is not None:
                    with contextlib.suppress(GpuflowError):
                        target = resolve(cluster_name)  # its head node now: a relaunch replaced the first
                if target is not None:
                    _stop_live_jobs(target, say)
                clusters.down(cluster_name, sandbox=recorded_sandbox, project_dir=run_arguments.get("project_dir"))
            except BaseException as teardown_error:
                if primary is None:
                    raise
                again = clusters.command_hint(f"down {cluster_name}", bool(recorded_sandbox))
                say(f"teardown of {cluster_name} failed too: {teardown_error} — run {again}")


def _stop_live_jobs(target: RunTarget, say: Say, grace_seconds: float = 5) -> None:
    """Before teardown: stop jobs still running on the head node (a sandbox
    "instance" is this machine, whose processes no termination would end).
    Best effort: teardown goes ahead whatever happens here."""
    try:
        runner = target.connect()
        try:
            for run_dir, report in run_status(runner, "--all", runner.base_dir).items():
                if report.get("job") == ProcessLiveness.ALIVE.value and report.get("exit_code") is None:
                    say(f"stopping the job still running in {run_dir}")
                    stop_job(runner, run_dir, grace_seconds=grace_seconds)
        finally:
            with contextlib.suppress(Exception):
                runner.close()
    except (GpuflowError, OSError, json.JSONDecodeError) as exc:
        say(f"could not check for running jobs before teardown: {exc}")


def _stop_on_interrupt(_record: RunRecord) -> InterruptChoice:
    return InterruptChoice.STOP
