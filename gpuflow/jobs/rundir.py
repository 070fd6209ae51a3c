"""A run directory on the target, read and acted on: its exit code and pid, its liveness (proven by identity), stopping its job."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from gpuflow.errors import NotFound, RemoteCommandFailed
from gpuflow.jobs import scripts
from gpuflow.jobs.records import EXIT_CODE_NAME, PID_NAME, ProcessLiveness, RunState, RunStatus, StopOutcome
from gpuflow.transport.base import CommandRunner


def read_small(runner: CommandRunner, path: str) -> str | None:
    """A small remote file's text, or None when it does not exist (yet)."""
    try:
        data = runner.read_from(path, 0, 4096)
    except (NotFound, RemoteCommandFailed, FileNotFoundError):
        return None
    text = data.decode(errors="replace").strip()
    return text or None


def read_exit_code(runner: CommandRunner, remote_dir: str) -> int | None:
    text = read_small(runner, f"{remote_dir}/{EXIT_CODE_NAME}")
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Liveness:
    """What :func:`gpuflow.procs.status` found in a run directory (the same proof
    ``gpuflow runs``, ``stop`` and a sandbox termination use)."""

    exists: bool
    job: ProcessLiveness  # NONE: never recorded (not started)
    supervisor: ProcessLiveness
    exit_code: int | None
    alive: bool  # the job or its supervisor


def run_status(runner: CommandRunner, *run_dirs: str) -> dict[str, dict[str, Any]]:
    """:data:`~gpuflow.jobs.scripts.RUN_STATUS_PY` on the target: for each run
    directory (or ``"--all", BASE``), whether its job and its supervisor are
    proven alive (:func:`gpuflow.procs.status`) and its exit code."""
    # From "/": the check must work when the base directory itself is gone.
    argv = [runner.python, "-I", "-S", "-c", scripts.RUN_STATUS_PY, *run_dirs]
    return json.loads(runner.run(argv, cwd="/", timeout=60).stdout)


def classify(report: dict[str, Any]) -> RunStatus:
    """A run's status from its :func:`run_status` report: its exit code's, else
    running while its job or supervisor lives, else lost."""
    exit_code = report.get("exit_code")
    if exit_code is not None:
        return RunStatus.of_exit_code(int(exit_code))
    return RunStatus(RunState.RUNNING if report.get("alive") else RunState.LOST)


def job_liveness(runner: CommandRunner, remote_dir: str) -> Liveness | None:
    """Whether the run's job or its supervisor still lives, each proven by its
    recorded identity (a reused pid is not the job); None when the check itself
    failed.  Connection failures are raised (the caller reconnects)."""
    try:
        report = run_status(runner, remote_dir)[remote_dir]
        code = report.get("exit_code")
        return Liveness(
            exists=bool(report["exists"]),
            job=ProcessLiveness(report["job"]),
            supervisor=ProcessLiveness(report["supervisor"]),
            exit_code=int(code) if code is not None else None,
            alive=bool(report["alive"]),
        )
    except (RemoteCommandFailed, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def lost_reason(liveness: Liveness, remote_dir: str) -> str:
    """Why a run whose job is not alive and has no exit code is lost."""
    if not liveness.exists:
        return f"its run directory {remote_dir} is gone"
    if liveness.job is ProcessLiveness.NONE:
        return "its supervisor is gone and never started the job"
    return "the job's process is gone without an exit code (its supervisor is gone too)"


def stop_job(runner: CommandRunner, remote_dir: str, *, grace_seconds: float = 10) -> StopOutcome:
    """SIGTERM the job's process group, SIGKILL after ``grace_seconds``.

    Returns FINISHED (it had already ended), TERMINATED, KILLED or GONE.
    The supervisor is outside that group and records the exit code.  Only the
    process recorded with its identity is signalled (:mod:`gpuflow.procs`): a
    process that merely reuses the job's pid is never touched (GONE).
    """
    if read_exit_code(runner, remote_dir) is not None:
        return StopOutcome.FINISHED
    pid_text = read_small(runner, f"{remote_dir}/{PID_NAME}")
    if pid_text is None or not pid_text.isdigit() or int(pid_text) <= 1:
        raise RemoteCommandFailed(f"{remote_dir}/{PID_NAME} holds no job pid", hint="the job may not have started")
    grace = max(0.0, float(grace_seconds))
    argv = [runner.python, "-I", "-S", "-c", scripts.STOP_JOB_PY, remote_dir, f"{grace:g}"]
    said = runner.run(argv, timeout=grace + 60).text().strip() or StopOutcome.TERMINATED.value
    try:
        outcome = StopOutcome(said)
    except ValueError:
        raise RemoteCommandFailed(f"stopping the job in {remote_dir} answered {said[-200:]!r}") from None
    if outcome is StopOutcome.GONE:
        return outcome
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read_exit_code(runner, remote_dir) is None:
        time.sleep(0.1)
    return outcome
