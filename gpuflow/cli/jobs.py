"""gpuflow CLI: `run`, `logs`, `pull`, `runs`, `stop` (thin: the work is in gpuflow.jobs).

The job's own output goes to stdout byte for byte; gpuflow's remarks go to
stderr, so `gpuflow run ... > train.log` captures exactly the job's log.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer

from gpuflow.cli import _confirm
from gpuflow.cli._app import app
from gpuflow.cli._grammar import JOB_ARGS, SAW_DOUBLE_DASH, RunCommand
from gpuflow.cli._signals import ended_by_signals
from gpuflow.cli._table import table_lines
from gpuflow.config import find_project_root, read_project_config
from gpuflow.errors import ClusterNotFound, DataError, DetachedByInterrupt, JobFailed, NotFound, RunLost, Terminated, UsageError


def _say(message: str) -> None:
    typer.echo(f"gpuflow: {message}", err=True)


def _ask_stop_or_detach(record: Any) -> Any:
    """Ctrl-C during `run`: ask when a person is there, else detach (SIGTERM: detach, never ask).
    Returns an :class:`~gpuflow.jobs.InterruptChoice`."""
    from gpuflow.jobs import InterruptChoice

    if isinstance(sys.exc_info()[1], Terminated):  # called while handling the interrupt
        return InterruptChoice.DETACH
    if sys.stdin is not None and sys.stdin.isatty():
        answer = typer.prompt(
            f"\nStop run {record.run_id} on the instance [s], or detach and leave it running [d]?",
            default="d",
            err=True,
        )
        if answer.strip().lower().startswith("s"):
            return InterruptChoice.STOP
    return InterruptChoice.DETACH


@app.command("run", cls=RunCommand)
def run_command(
    ctx: typer.Context,
    positionals: Optional[list[str]] = typer.Argument(  # noqa: UP007 - typer needs Optional on 3.10
        None,
        metavar="[NAME] [MODULE]",
        help="The cluster (optional: the project's `cluster` setting, else the only cluster) and the module to run "
        "(e.g. training.cifar10_cnn). Job arguments, or a whole command instead of a module, go after `--`.",
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="Start the job and return; follow it with `gpuflow logs`."),
    project_dir: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--project-dir", metavar="DIR", help="Project to sync and run (default: the project around the current directory)."
    ),
    data: Optional[Path] = typer.Option(  # noqa: UP007
        None, "--data", metavar="DIR", help="Sync this data directory to the instance first (kept for later runs); the job finds it "
        "in $GPUFLOW_DATA_DIR, and a training module gets --data-dir pointing at it.",
    ),
    up: bool = typer.Option(False, "--up", help="Launch the cluster first if it does not exist."),
    down: bool = typer.Option(False, "--down", help="Tear the cluster down afterwards, even when the job fails."),
    instance_type: Optional[str] = typer.Option(None, "--instance-type", metavar="TYPE", help="With --up: the instance type."),  # noqa: UP007
    region: Optional[str] = typer.Option(None, "--region", help="With --up: the AWS region."),  # noqa: UP007
    spot: bool = typer.Option(False, "--spot", help="With --up: a spot instance."),
    spot_fallback: bool = typer.Option(False, "--spot-fallback", help="With --up --spot: on-demand when no zone has spot capacity."),
    count: Optional[int] = typer.Option(  # noqa: UP007
        None, "--count", metavar="N", help="With --up: N instances; the run uses every one (see --nodes)."
    ),
    idle_minutes: Optional[int] = typer.Option(None, "--idle-minutes", metavar="MINUTES", help="With --up: dead-man's switch idle window."),  # noqa: UP007
    max_hours: Optional[float] = typer.Option(None, "--max-hours", metavar="HOURS", help="With --up: hard cap on the instance's life."),  # noqa: UP007
    sandbox: bool = typer.Option(False, "--sandbox", help="With --up: in the sandbox cloud (no AWS account)."),
    resume: Optional[str] = typer.Option(  # noqa: UP007
        None, "--resume", metavar="RUN", help="Start an interrupted run's job again where its checkpoint stands: same "
        "command, cluster and run directory, log appended (also a failed or lost run that left a checkpoint).",
    ),
    env: Optional[list[str]] = typer.Option(  # noqa: UP007
        None, "--env", metavar="VARIABLE", help="Add VARIABLE, given as NAME=VALUE, to the job's environment "
        "(repeatable), e.g. TF_CPP_MIN_LOG_LEVEL=3 to quiet TensorFlow's C++ log.",
    ),
    recover: Optional[bool] = typer.Option(  # noqa: UP007
        None, "--recover/--no-recover", help="When the instance is interrupted (spot), relaunch a node and continue "
        "the same run there from its checkpoint (default: `recover` in gpuflow.toml, else off).",
    ),
    max_restarts: Optional[int] = typer.Option(  # noqa: UP007
        None, "--max-restarts", metavar="N", help="With --recover: restart at most N times (default 5)."
    ),
    fallback_types: Optional[str] = typer.Option(  # noqa: UP007
        None, "--fallback-types", metavar="TYPES", help="With --recover: instance types to relaunch on when the "
        "cluster's own has no capacity, in order (comma-separated).",
    ),
    restart_on_exit_codes: Optional[str] = typer.Option(  # noqa: UP007
        None, "--restart-on-exit-codes", metavar="CODES", help="With --recover: also restart a job that fails with "
        "one of these exit codes (comma-separated; other failures are never restarted).",
    ),
    max_dollars: Optional[float] = typer.Option(  # noqa: UP007
        None, "--max-dollars", metavar="USD", help="With --recover: stop the run, its checkpoint saved, before the "
        "estimated cost of all its attempts would pass USD.",
    ),
    nodes: Optional[int] = typer.Option(  # noqa: UP007
        None, "--nodes", metavar="K", min=1, help="Run on the cluster's first K nodes only (default: every node; "
        "on several, each job gets TF_CONFIG, GPUFLOW_NUM_WORKERS and GPUFLOW_WORKER_INDEX; node 0 is the chief).",
    ),
) -> None:
    """Run a module or a command on a cluster and stream its log.

    Syncs the project, starts MODULE (or the command after `--`) detached on the
    cluster, streams its log, pulls its outputs into runs/RUN_ID/ and exits with
    the job's exit code.

    The forms are `gpuflow run [NAME] MODULE [-- ARGS]` and `gpuflow run [NAME] --
    COMMAND`. A single word before `--` is the cluster NAME when it is a known
    cluster, or when a command follows after `--` and the word is no module (no
    dot, nor close to a module's name); otherwise it is the MODULE. A known
    cluster alone is refused: say what to run on it. MODULE must exist in the project or the shipped training package
    (checked before anything is synced); run any other module as a command: `--
    python -m MODULE`. Everything after `--` reaches the job literally; job
    options given before `--` are refused with the corrected command.
    """
    from gpuflow import jobs

    job_args: list[str] = ctx.meta.get(JOB_ARGS, [])
    job_env = jobs.parse_job_env(env or [])  # before anything is launched
    if resume is not None:
        given = [flag for flag, value in (
            ("NAME/MODULE", positionals), ("a command after `--`", job_args or ctx.meta.get(SAW_DOUBLE_DASH)),
            ("--up", up), ("--down", down), ("--data", data), ("--project-dir", project_dir),
            ("--instance-type", instance_type), ("--region", region), ("--spot", spot), ("--spot-fallback", spot_fallback),
            ("--count", count is not None),
            ("--idle-minutes", idle_minutes is not None), ("--max-hours", max_hours is not None), ("--sandbox", sandbox),
            ("--env", env), ("--recover", recover is not None), ("--max-restarts", max_restarts is not None),
            ("--fallback-types", fallback_types), ("--restart-on-exit-codes", restart_on_exit_codes),
            ("--max-dollars", max_dollars is not None), ("--nodes", nodes is not None),
        ) if value]
        if given:
            raise UsageError(
                f"--resume RUN continues the run's own command on its own cluster: drop {', '.join(given)}",
                hint=f"gpuflow run --resume {resume}{' --detach' if detach else ''}",
            )
        with ended_by_signals() as signals:
            outcome = jobs.resume(
                resume, out=sys.stdout.buffer, detach=detach, on_interrupt=_ask_stop_or_detach, say=_say
            )
        _report_outcome(
            outcome, outcome.record.cluster, detach=detach, signals=signals, project=Path(outcome.record.project_dir)
        )
        return
    project = (project_dir or find_project_root()).resolve()
    name, module = _split_positionals(ctx, list(positionals or []), job_args, project, up=up)
    recovery = _recovery_policy(project, recover, max_restarts, fallback_types, restart_on_exit_codes, max_dollars)
    if recovery is not None and detach:
        raise UsageError("--recover follows the run to restart it: it cannot --detach", hint="drop --detach")
    up_spec = None
    if up:
        options = {"instance_type": instance_type, "region": region, "idle_minutes": idle_minutes,
                   "max_hours": max_hours, "spot": spot or None, "spot_fallback": spot_fallback or None,
                   "sandbox": sandbox or None, "count": count}
        up_spec = jobs.up_spec_for_run(name, project_dir=project, **options)
        name = up_spec.name
    elif (sandbox or instance_type or region or spot or spot_fallback or idle_minutes is not None
          or max_hours is not None or count is not None):
        raise UsageError("--instance-type, --region, --spot, --spot-fallback, --count, --idle-minutes, --max-hours "
                         "and --sandbox need --up")
    cluster_name = jobs.resolve_cluster_name(name, project_dir=project)
    with ended_by_signals() as signals, _offering_gitignore(project, (JobFailed, RunLost)):
        try:
            outcome = jobs.run_on_cluster(
                cluster_name,
                project_dir=project,
                module=module,
                args=job_args,
                out=sys.stdout.buffer,
                up_spec=up_spec,
                down=down,
                detach=detach,
                on_interrupt=_ask_stop_or_detach,
                say=_say,
                data_dir=_existing_directory(data, "--data") if data is not None else None,
                env=job_env,
                recovery=recovery,
                nodes=nodes,
            )
        except ClusterNotFound as exc:
            if up_spec is not None:  # --up made or refused the cluster itself, and said why
                raise
            from gpuflow.clusters import explain_unknown

            raise explain_unknown(cluster_name, exc, project_dir=project) from exc  # whose a cluster of that name is, when its tags say
    _report_outcome(outcome, cluster_name, detach=detach, signals=signals, project=project)


def _recovery_policy(project: Path, recover: Any, max_restarts: Any, fallback_types: Any, restart_codes: Any,
                     max_dollars: Any) -> Any:
    """The ``--recover`` options over the project's gpuflow.toml (None: recovery is off)."""
    from gpuflow.jobs.recover import recovery_policy

    return recovery_policy(
        read_project_config(project).recovery, recover=recover, max_restarts=max_restarts,
        fallback_types=fallback_types, restart_on_exit_codes=restart_codes, max_dollars=max_dollars,
    )


def _report_outcome(outcome: Any, cluster_name: str, *, detach: bool, signals: list[int], project: Path) -> None:
    """The last words of `run` (and `run --resume`) on an outcome that raised nothing."""
    if outcome.detached:
        run_id = outcome.record.run_id
        how = (
            f"`gpuflow logs {run_id} -f` to follow it, `gpuflow pull {run_id}` for its outputs, "
            f"`gpuflow stop {run_id}` to stop it"
        )
        if not detach:  # Ctrl-C (or SIGTERM) answered with "detach"
            import signal

            detached = DetachedByInterrupt(f"detached: run {run_id} keeps running on {cluster_name}", hint=how)
            if signals and signals[-1] == signal.SIGTERM:
                detached.exit_code = 128 + signal.SIGTERM
            raise detached
        _say(f"run {run_id} keeps running on {cluster_name}: {how}")
        return
    _say(f"run {outcome.record.run_id} succeeded; outputs in {outcome.record.local_dir}")
    _offer_gitignore(project)


@contextlib.contextmanager
def _offering_gitignore(project: Path, failures: tuple[type[BaseException], ...]) -> Iterator[None]:
    """A job that failed or was lost had its files pulled all the same: offer it then too."""
    try:
        yield
    except failures:
        _offer_gitignore(project)
        raise


def _offer_gitignore(project: Path) -> None:
    """Runs pulled into a git repository that does not ignore them: say so once per project
    and, on a terminal, ask whether to add them to .gitignore (never edited unasked)."""
    from gpuflow import jobs

    found = jobs.unignored_runs(project)
    if found is None:
        return
    pattern = jobs.RUNS_PATTERN
    if not _confirm.stdin_is_terminal():
        jobs.remember_gitignore_answer(found, jobs.GitignoreAnswer.HINTED)
        _say(f"{found.line()} (add {pattern} to {found.gitignore}; said once)")
        return
    _say(found.line())
    try:
        add = _confirm.ask(f"Add {pattern} to {found.gitignore}?")
    except (KeyboardInterrupt, EOFError):
        add = False
        typer.echo("", err=True)
    if add:
        written = jobs.add_runs_to_gitignore(found)
        jobs.remember_gitignore_answer(found, jobs.GitignoreAnswer.ADDED)
        _say(f"added {pattern} to {written}")
    else:
        jobs.remember_gitignore_answer(found, jobs.GitignoreAnswer.DECLINED)
        _say(f"{found.gitignore} left as it was; not asked again for this project")


def _existing_directory(path: Path, option: str) -> Path:
    from gpuflow.sync import data_name

    resolved = path.expanduser().resolve()
    if not resolved.is_dir():
        raise DataError(f"{option} {path}: no such directory")
    data_name(resolved)  # its basename names the remote directory: refuse a bad one before syncing anything
    return resolved


def _split_positionals(
    ctx: typer.Context, positionals: list[str], job_args: list[str], project: Path, *, up: bool = False
) -> tuple[str | None, str | None]:
    """[NAME] [MODULE], one rule for every form: two words are NAME MODULE; a
    single word is NAME when it is a known cluster (then a job must follow:
    MODULE, or a command after `--`), or when a command follows after `--` and
    it is no module (no dot, nor the name of a module; with --up, a dot is
    fine: the cluster to launch); otherwise MODULE.  A MODULE must exist in the
    project or the shipped training package (checked here, before anything is
    synced or launched)."""
    from gpuflow import jobs
    from gpuflow.jobs.modulecheck import check_module, closest_module, module_exists

    if len(positionals) > 2:
        raise UsageError(
            f"unexpected argument(s) {' '.join(positionals[2:])!r}: the job's arguments go after `--`",
            hint=ctx.command.corrected_line(ctx),
        )
    if len(positionals) == 2:
        name, module = positionals
        check_module(module, project)
        return name, module
    if len(positionals) == 1:
        word = positionals[0]
        if jobs.is_known_cluster(word):
            if not job_args:
                raise UsageError(
                    f"{word} is a cluster: say what to run on it",
                    hint=f"gpuflow run {word} MODULE [-- ARGS], or gpuflow run {word} -- COMMAND",
                )
            return word, None
        if job_args and not module_exists(word, project) and (up or "." not in word):
            # No module and a command follows: the cluster (to launch, with --up; else the lookup says
            # that no such cluster exists, or whose it is), unless it is a near-miss of a module's name.
            closest = None if up else closest_module(word, project)
            if closest is None:
                return word, None
            raise NotFound(
                f"{word!r} is neither a known cluster nor a module of the project or the shipped training package",
                hint=f"did you mean {closest}?",
            )
        check_module(word, project, also_not="a known cluster")
        return None, word
    if not job_args:
        more = ": nothing after `--`" if ctx.meta.get(SAW_DOUBLE_DASH) else ""
        raise UsageError(
            f"nothing to run{more}", hint="gpuflow run [NAME] MODULE [-- ARGS], or gpuflow run [NAME] -- COMMAND"
        )
    return None, None


@app.command("resume")
def resume_command(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run id (see `gpuflow runs`)."),
    on: Optional[str] = typer.Option(  # noqa: UP007
        None, "--on", metavar="NAME", help="Continue it on this cluster (its own is gone, or another is wanted)."
    ),
    up: bool = typer.Option(False, "--up", help="Launch the cluster (--on NAME, else the run's own name) first."),
    down: bool = typer.Option(False, "--down", help="Tear that cluster down afterwards, whatever happens."),
    instance_type: Optional[str] = typer.Option(None, "--instance-type", metavar="TYPE", help="With --up: the instance type."),  # noqa: UP007
    region: Optional[str] = typer.Option(None, "--region", help="With --up: the AWS region."),  # noqa: UP007
    spot: bool = typer.Option(False, "--spot", help="With --up: a spot instance."),
    spot_fallback: bool = typer.Option(False, "--spot-fallback", help="With --up --spot: on-demand when no zone has spot capacity."),
    sandbox: bool = typer.Option(False, "--sandbox", help="With --up: in the sandbox cloud (no AWS account)."),
    detach: bool = typer.Option(False, "--detach", "-d", help="On its own cluster: start it and return."),
    recover: Optional[bool] = typer.Option(None, "--recover/--no-recover", help="Relaunch and continue again after an interruption."),  # noqa: UP007
    max_restarts: Optional[int] = typer.Option(None, "--max-restarts", metavar="N", help="With --recover: at most N restarts."),  # noqa: UP007
    fallback_types: Optional[str] = typer.Option(None, "--fallback-types", metavar="TYPES", help="With --recover: types to relaunch on."),  # noqa: UP007
    restart_on_exit_codes: Optional[str] = typer.Option(None, "--restart-on-exit-codes", metavar="CODES", help="With --recover: failures to restart."),  # noqa: UP007
    max_dollars: Optional[float] = typer.Option(None, "--max-dollars", metavar="USD", help="With --recover: the run's cost cap."),  # noqa: UP007
) -> None:
    """Continue an interrupted run later, from its checkpoint.

    Without --on/--up it is `gpuflow run --resume RUN`: the job starts again on
    its own cluster, in its run directory. With --on NAME (or --up) it continues
    on another cluster as the next attempt of the same run (same id, command,
    --env and --data; its latest committed checkpoint restored from the durable
    store, else it starts over, and says so).
    """
    from gpuflow import jobs

    elsewhere = on is not None or up
    if not elsewhere:
        given = [flag for flag, value in (
            ("--down", down), ("--instance-type", instance_type), ("--region", region), ("--spot", spot),
            ("--spot-fallback", spot_fallback), ("--sandbox", sandbox), ("--recover", recover is not None), ("--max-restarts", max_restarts is not None),
            ("--fallback-types", fallback_types), ("--restart-on-exit-codes", restart_on_exit_codes),
            ("--max-dollars", max_dollars is not None),
        ) if value]
        if given:
            raise UsageError(
                f"{', '.join(given)}: only with --on NAME or --up (on its own cluster the run continues as it was)",
                hint=f"gpuflow resume {run_id} --on NAME",
            )
        with ended_by_signals() as signals:
            outcome = jobs.resume(run_id, out=sys.stdout.buffer, detach=detach, on_interrupt=_ask_stop_or_detach, say=_say)
        _report_outcome(
            outcome, outcome.record.cluster, detach=detach, signals=signals, project=Path(outcome.record.project_dir)
        )
        return
    if detach:
        raise UsageError("--detach only resumes a run on its own cluster", hint="drop --detach")
    if not up and (instance_type or region or spot or spot_fallback or sandbox):
        raise UsageError("--instance-type, --region, --spot, --spot-fallback and --sandbox need --up")
    record = jobs.load_record(run_id)
    project = Path(record.project_dir)
    name = on or record.cluster
    up_spec = None
    if up:
        up_spec = jobs.up_spec_for_run(
            name, project_dir=project, instance_type=instance_type, region=region, spot=spot or None,
            spot_fallback=spot_fallback or None, sandbox=sandbox or None,
        )
        name = up_spec.name
    elif not jobs.is_known_cluster(name):
        raise ClusterNotFound(f"no cluster {name!r} is known here", hint=f"add --up to launch it: gpuflow resume {run_id} --on {name} --up")
    recovery = _recovery_policy(project, recover, max_restarts, fallback_types, restart_on_exit_codes, max_dollars)
    with ended_by_signals() as signals:
        outcome = jobs.resume_elsewhere(
            run_id, name, out=sys.stdout.buffer, policy=recovery, up_spec=up_spec, down=down,
            on_interrupt=_ask_stop_or_detach, say=_say,
        )
    _report_outcome(outcome, name, detach=False, signals=signals, project=project)


@app.command("logs")
def logs_command(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run id (see `gpuflow runs`)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
    node: Optional[int] = typer.Option(  # noqa: UP007
        None, "--node", metavar="I", min=0, help="A multi-node run: the log of node I (default: the chief's, node 0)."
    ),
    all_nodes: bool = typer.Option(False, "--all", help="A multi-node run: every node's log, each line prefixed by its node."),
) -> None:
    """Print a run's log.

    With -f it follows the log until the job ends (resuming after connection
    drops), or until the run is found lost (its process, run directory or
    instance gone: exit 9).
    """
    from gpuflow import jobs

    if node is not None or all_nodes:
        if node is not None and all_nodes:
            raise UsageError("--node and --all contradict each other", hint="drop one of them")
        if all_nodes and follow:
            raise UsageError("--all prints every node's log as it is now", hint=f"follow one node: gpuflow logs {run_id} -f --node I")
        with ended_by_signals():
            exit_code = jobs.node_logs(run_id, out=sys.stdout.buffer, node=node, follow=follow, say=_say)
        if follow and exit_code not in (None, 0):
            raise JobFailed(f"run {run_id}: node {node}'s job ended with exit code {exit_code}", job_exit_code=exit_code, run_id=run_id)
        return
    with ended_by_signals():
        exit_code = jobs.logs(run_id, out=sys.stdout.buffer, follow=follow, say=_say)
    record = jobs.load_record(run_id)
    if exit_code is not None and record.status is jobs.RunState.INTERRUPTED:
        interrupted = jobs.interrupted_error(record)
        if follow:  # it ended interrupted: exit 75, as `run` does
            raise interrupted
        _say(interrupted.one_line())
        return
    if follow and exit_code not in (None, 0):
        raise JobFailed(f"run {run_id} ended with exit code {exit_code}", job_exit_code=exit_code, run_id=run_id)


@app.command("pull")
def pull_command(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run id (see `gpuflow runs`)."),
) -> None:
    """Fetch a run's outputs into runs/RUN_ID/.

    Outputs, log and manifest are verified by sha256; also while the job runs
    (the latest checkpoint).
    """
    from gpuflow import jobs

    record, report = jobs.pull(run_id, say=_say)
    state = "still running" if not record.finished else record.status_text()
    typer.echo(f"{report.local_dir} ({len(report.fetched)} new, {len(report.unchanged)} unchanged; job {state})")
    _offer_gitignore(Path(record.project_dir))


@app.command("runs")
def runs_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List runs with their status.

    A status is running, succeeded, failed(CODE), lost or unreachable.
    """
    import json

    from gpuflow import jobs

    statuses = jobs.list_runs()
    if as_json:
        typer.echo(json.dumps([status.to_dict() for status in statuses], indent=2))
        return
    if not statuses:
        typer.echo("no runs yet: `gpuflow run MODULE` starts one")
        return
    rows = [
        (
            status.record.run_id,
            status.record.cluster,
            str(status.status),  # running, succeeded, failed(CODE), ...
            status.record.started_at,
            # as it would be typed: arguments stay distinct
            status.record.module or shlex.join(status.record.command),
        )
        for status in statuses
    ]
    for line in table_lines(("RUN", "CLUSTER", "STATUS", "STARTED", "COMMAND"), rows):
        typer.echo(line)
    for status in statuses:  # what a durable run never got into S3, one line each
        if status.record.durable_problem:
            typer.echo(f"run {status.record.run_id}: {status.record.durable_problem}")


@app.command("stop")
def stop_command(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run id (see `gpuflow runs`)."),
    grace: Optional[float] = typer.Option(  # noqa: UP007
        None, "--grace", min=0, metavar="SECONDS",
        help="Seconds between SIGTERM and SIGKILL (default 120: a spot notice's two minutes, time to save).",
    ),
) -> None:
    """Save and stop a running job.

    Its process group gets SIGTERM (a training module saves a checkpoint and
    exits 75: interrupted, resumable with `gpuflow run --resume RUN`), and
    SIGKILL after the grace period.
    """
    from gpuflow import jobs

    record, outcome = jobs.stop(run_id, grace_seconds=jobs.STOP_GRACE_SECONDS if grace is None else grace)
    if outcome is jobs.StopOutcome.FINISHED:
        ended = f", ended {record.ended_at}" if record.ended_at else ""
        typer.echo(
            f"run {run_id} had already finished: {record.status_text()} (exit code {record.exit_code}{ended}); "
            "nothing to stop"
        )
    elif outcome is jobs.StopOutcome.GONE and record.status is jobs.RunState.LOST:
        typer.echo(f"run {run_id} is lost ({record.lost_reason or 'no process of it is left'}): nothing to stop")
    else:
        typer.echo(f"run {run_id} {outcome}: {record.status_text()}")
    if record.status is jobs.RunState.INTERRUPTED:
        _say(f"continue it with `gpuflow run --resume {run_id}`")
