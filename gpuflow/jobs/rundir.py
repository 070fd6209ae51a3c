"""A run directory on the target, read and acted on: its exit code and pid, its liveness (proven by identity), stopping its job."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from gpuflow.errors import NotFound, RemoteCommandFailed
from gpuflow.jobs import scripts
from gpuflow.jobs.records import (
    CHECKPOINT_STATE,
    EXIT_CODE_NAME,
    INTERRUPTED_EXIT_CODE,
    INTERRUPTION_NAME,
    PID_NAME,
    ProcessLiveness,
    STOP_GRACE_SECONDS,
    Checkpoint,
    RunState,
    RunStatus,
    StopOutcome,
)
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


def read_json(runner: CommandRunner, path: str) -> Any:
    """A small remote JSON file's content, or None (absent, unreadable, not JSON)."""
    text = read_small(runner, path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def read_checkpoint(runner: CommandRunner, remote_dir: str) -> Checkpoint | None:
    """The run's resumable checkpoint (``outputs/checkpoint/state.json``), when complete."""
    return Checkpoint.parse(read_json(runner, f"{remote_dir}/{CHECKPOINT_STATE}"))


def ended_status(runner: CommandRunner, remote_dir: str, exit_code: int) -> RunStatus:
    """The status of a job that ended with ``exit_code`` (an interrupted one's with its checkpoint)."""
    checkpoint = read_checkpoint(runner, remote_dir) if exit_code == INTERRUPTED_EXIT_CODE else None
    return RunStatus.of_exit_code(exit_code, checkpoint)


def _moment(notice: Any, key: str) -> str:
    value = notice.get(key) if isinstance(notice, dict) else None
    return str(value) if value else "an unknown time"


def interruption_text(document: Any) -> str | None:
    """The watcher's ``interruption.json`` in words, or None."""
    if not isinstance(document, dict):
        return None
    notice = document.get("notice")
    action = notice.get("action") if isinstance(notice, dict) else None
    return (
        f"spot interruption notice ({action or 'interruption'} at {_moment(notice, 'time')}), "
        f"seen at {document.get('seen_at') or 'an unknown time'}"
    )


def rebalance_text(document: Any) -> str | None:
    """The watcher's ``rebalance.json`` in words, or None."""
    if not isinstance(document, dict):
        return None
    return f"rebalance recommended at {_moment(document.get('notice'), 'noticeTime')}"


def read_interruption(runner: CommandRunner, remote_dir: str) -> str | None:
    return interruption_text(read_json(runner, f"{remote_dir}/{INTERRUPTION_NAME}"))


@dataclass(frozen=True)
class Liveness:
    """What :func:`gpuflow.procs.status` found in a run directory (the same proof
    ``gpuflow runs``, ``stop`` and a sandbox termination use)."""

    exists: bool
    job: ProcessLiveness  # NONE: never recorded (not started)
    supervisor: ProcessLiveness
    exit_code: int | None
    alive: bool  # the job or its supervisor
    interruption: str | None = None  # a spot interruption notice the watcher acted on, in words
    rebalance: str | None = None  # a rebalance recommendation it recorded, in words


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
        return RunStatus.of_exit_code(int(exit_code), Checkpoint.parse(report.get("checkpoint")))
    if not report.get("alive"):
        return RunStatus(RunState.LOST)
    notice = interruption_text(report.get("interruption"))
    note = f"{notice}: saving" if notice else rebalance_text(report.get("rebalance"))
    return RunStatus(RunState.RUNNING, note=note)


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
            interruption=interruption_text(report.get("interruption")),
            rebalance=rebalance_text(report.get("rebalance")),
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


def stop_job(runner: CommandRunner, remote_dir: str, *, grace_seconds: float = STOP_GRACE_SECONDS) -> StopOutcome:
    """SIGTERM the job's process group, SIGKILL after ``grace_seconds`` (save and stop:
    a training module saves its checkpoint on SIGTERM and exits 75).

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


def await_environment(runner: CommandRunner, remote_dir: str, timeout: float = 30) -> None:
    """One command: wait on the target while the run's environment probe still runs
    (``environment.pending``: the job's exit code does not wait for it), at most ``timeout``."""
    runner.run_script(scripts.await_environment_script(remote_dir, timeout), timeout=timeout + 30, check=False)
