"""Jobs on an instance: run, follow the log, pull the outputs, list, stop.

A run is started detached on the target (see :mod:`gpuflow.jobs.scripts`):
gpuflow only ever *observes* it — by reading ``job.log`` from a byte offset
and checking for ``exit_code`` — so a dropped connection, a sleeping laptop
or gpuflow exiting never touches the job, and a reconnect continues the log
exactly where it stopped.

Everything here talks to the instance through the
:class:`~gpuflow.transport.base.CommandRunner` protocol, obtained from a
:class:`RunTarget` whose ``connect`` builds a fresh runner (used again to
reconnect).  The same code therefore runs against a local directory (the
sandbox, tests) and over SSH; what differs (the interpreters the target
offers) is a property of the runner, decided where it is created.

Remote layout (``<base>`` is ``runner.base_dir``)::

    <base>/project/            synced project, the job's working directory
    <base>/envs/<hash>/        virtualenv per hash of the project's requirements
    <base>/runs/<run-id>/      supervisor.sh, job.pid, job.log, exit_code, outputs/, manifest.json
    <base>/heartbeat           touched while a job runs

Locally, a run's files land in ``<project>/runs/<run-id>/`` and its record in
the ``runs`` collection of the state cache.

Modules, each owning one thing (imports go down this list only):

* :mod:`~gpuflow.jobs.records` — typed status (:class:`RunState`, :class:`RunStatus`),
  the Ctrl-C choice, the run record and its store, targets and outcomes.
* :mod:`~gpuflow.jobs.scripts` — every script run on the instance, and the one quoting path.
* :mod:`~gpuflow.jobs.environment` — the job's interpreter, virtualenv and argv.
* :mod:`~gpuflow.jobs.modulecheck` — whether ``run MODULE`` names a module that will run, checked locally.
* :mod:`~gpuflow.jobs.manifest` — the run manifest.
* :mod:`~gpuflow.jobs.rundir` — a run directory read and acted on (exit code, liveness, stop).
* :mod:`~gpuflow.jobs.start` — starting a run detached.
* :mod:`~gpuflow.jobs.connection` — reconnecting after a drop.
* :mod:`~gpuflow.jobs.follow` — following the log.
* :mod:`~gpuflow.jobs.local_copy` — a run's pulled files: what the last pull left, what is missing.
* :mod:`~gpuflow.jobs.pulling` — pulling the run's files.
* :mod:`~gpuflow.jobs.gitignore` — pulled runs in a git repository that does not ignore them.
* :mod:`~gpuflow.jobs.foreground` — the ``run`` use case on a target.
* :mod:`~gpuflow.jobs.targets` — a named cluster as a run target.
* :mod:`~gpuflow.jobs.commands` — ``logs``, ``pull``, ``stop``, ``runs``.
* :mod:`~gpuflow.jobs.on_cluster` — ``run`` with ``--up`` / ``--down``.
* :mod:`~gpuflow.jobs.recover` — ``run --recover``: attempts on relaunched nodes, restart rules, budget.
* :mod:`~gpuflow.jobs.resume_on` — ``resume RUN --on|--up``: the next attempt of a run on another cluster.
* :mod:`~gpuflow.jobs.resume` — ``run --resume``: an interrupted run's job started again in place.
* :mod:`~gpuflow.jobs.imds_watch` — the spot-interruption watcher the supervisor runs on the instance.
* :mod:`~gpuflow.jobs.demo` — ``gpuflow demo``.
"""

from __future__ import annotations

from gpuflow.jobs.commands import list_runs, logs, node_logs, pull, stop
from gpuflow.jobs.connection import Connection
from gpuflow.jobs.environment import (
    base_python,
    build_job_argv,
    is_training_module,
    prepare_environment,
    requirements_hash,
    requirements_of,
)
from gpuflow.jobs.follow import LIVENESS_INTERVAL, JobVanished, follow_log
from gpuflow.jobs.foreground import follow_to_outcome, interrupted_error, run
from gpuflow.jobs.gitignore import (
    RUNS_PATTERN,
    GitignoreAnswer,
    UnignoredRuns,
    add_runs_to_gitignore,
    remember_gitignore_answer,
    unignored_runs,
)
from gpuflow.jobs.manifest import build_manifest, environment_fields, finish_manifest, git_state
from gpuflow.jobs.on_cluster import run_on_cluster
from gpuflow.jobs.pulling import list_remote_tree, pull_files, pull_run
from gpuflow.jobs.records import (
    EXIT_CODE_NAME,
    INTERRUPTED_EXIT_CODE,
    LOG_NAME,
    MANIFEST_NAME,
    OUTPUTS_NAME,
    PID_NAME,
    PULLED_NAMES,
    STOP_GRACE_SECONDS,
    Checkpoint,
    InterruptChoice,
    ListedRun,
    ProcessLiveness,
    PullReport,
    RunOutcome,
    Resume,
    RunRecord,
    RunState,
    RunStatus,
    RunTarget,
    Say,
    StopOutcome,
    all_records,
    load_record,
    new_run_id,
    quiet,
    save_record,
)
from gpuflow.jobs.recover import RecoveryPolicy, recovery_policy, run_with_recovery
from gpuflow.jobs.resume import resume
from gpuflow.jobs.resume_on import resume_elsewhere
from gpuflow.jobs.rundir import Liveness, job_liveness, lost_reason, run_status, stop_job
from gpuflow.jobs.start import parse_job_env, start_run, wait_for_start
from gpuflow.jobs.targets import (
    TargetResolver,
    is_known_cluster,
    resolve_cluster_name,
    target_for_cluster,
    up_spec_for_run,
)

__all__ = [
    "EXIT_CODE_NAME",
    "INTERRUPTED_EXIT_CODE",
    "STOP_GRACE_SECONDS",
    "Checkpoint",
    "Resume",
    "follow_to_outcome",
    "interrupted_error",
    "LIVENESS_INTERVAL",
    "LOG_NAME",
    "MANIFEST_NAME",
    "OUTPUTS_NAME",
    "PID_NAME",
    "PULLED_NAMES",
    "RUNS_PATTERN",
    "Connection",
    "GitignoreAnswer",
    "InterruptChoice",
    "JobVanished",
    "ListedRun",
    "Liveness",
    "ProcessLiveness",
    "PullReport",
    "RunOutcome",
    "RunRecord",
    "RunState",
    "RunStatus",
    "RunTarget",
    "Say",
    "StopOutcome",
    "TargetResolver",
    "UnignoredRuns",
    "add_runs_to_gitignore",
    "all_records",
    "base_python",
    "build_job_argv",
    "build_manifest",
    "environment_fields",
    "finish_manifest",
    "follow_log",
    "git_state",
    "is_known_cluster",
    "is_training_module",
    "job_liveness",
    "list_remote_tree",
    "list_runs",
    "load_record",
    "logs",
    "node_logs",
    "lost_reason",
    "new_run_id",
    "prepare_environment",
    "pull",
    "pull_files",
    "pull_run",
    "quiet",
    "remember_gitignore_answer",
    "requirements_hash",
    "requirements_of",
    "resume",
    "RecoveryPolicy",
    "recovery_policy",
    "run_with_recovery",
    "resume_elsewhere",
    "resolve_cluster_name",
    "run",
    "run_on_cluster",
    "run_status",
    "save_record",
    "parse_job_env",
    "start_run",
    "stop",
    "stop_job",
    "target_for_cluster",
    "unignored_runs",
    "up_spec_for_run",
    "wait_for_start",
]
