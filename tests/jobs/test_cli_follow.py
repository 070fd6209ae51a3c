"""`gpuflow run` and `gpuflow logs -f` as separate processes, the way a person
(or a CI script, without a terminal) uses them: they end when the job is gone
and when they get SIGINT or SIGTERM, and say why.

The sandbox cloud is the loopback server that `gpuflow up --sandbox` starts;
the last `down` stops it.  One test goes through the loopback OpenSSH server
(``GPUFLOW_SANDBOX_SSH``), the others through the sandbox's local directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jobs.conftest import job_args

pytestmark = pytest.mark.slow

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
BOUND = 60  # seconds a gpuflow process may take to end once it should (generous: a loaded 2-core machine)


def _environment(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT), **(extra or {})}


def _gpuflow(project: Path, *argv: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuflow", *argv], capture_output=True, text=True, env=env,
                          cwd=project, timeout=180, stdin=subprocess.DEVNULL)


def _start(project: Path, *argv: str, env: dict, ignore_sigint: bool = False) -> subprocess.Popen:
    """A gpuflow process with stdin closed (no terminal), as from a script or CI."""

    def no_terminal() -> None:
        os.close(0)
        if ignore_sigint:  # what a shell does to a command started with `&`
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-m", "gpuflow", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=project, preexec_fn=no_terminal)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"gpuflow still running {BOUND}s later; stderr: {err.decode()[-1500:]}") from None
    return process.returncode, out.decode(), err.decode()


def _wait_for_job(gpuflow_home: Path, cluster: str, count: int = 1) -> list[Path]:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        pid_files = sorted(gpuflow_home.glob(f"sandbox/{cluster}/*/runs/*/job.pid"))
        if len(pid_files) >= count and all(path.read_text().strip() for path in pid_files):
            logs = [path.parent / "job.log" for path in pid_files]
            if all(log.is_file() and log.stat().st_size > 0 for log in logs):
                return [path.parent for path in pid_files]
        time.sleep(0.1)
    raise AssertionError(f"no job started on {cluster}")


def _runs(project: Path, env: dict) -> dict[str, dict]:
    listed = _gpuflow(project, "runs", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    return {item["run_id"]: item for item in json.loads(listed.stdout)}


def _assert_lost_when_downed_elsewhere(
    project: Path, gpuflow_home: Path, cluster: str, env: dict, *, meanwhile=lambda run_id: None
) -> str:
    """`run` follows a job; `down` from another terminal ends it: `run` exits 9 saying why."""
    before = set(gpuflow_home.glob(f"sandbox/{cluster}/*/runs/*"))
    running = _start(project, "run", cluster, "--", *job_args(100_000, 0.05), env=env)
    run_dirs = _wait_for_job(gpuflow_home, cluster, count=len(before) + 1)
    [run_dir] = [path for path in run_dirs if path not in before]
    meanwhile(run_dir.name)
    downed = _gpuflow(project, "down", cluster, "--yes", env=env)
    assert downed.returncode == 0, downed.stderr
    code, out, err = _finish(running)
    assert code == 9, err
    assert out.startswith("line 0000 ")
    [line] = [line for line in err.splitlines() if line.startswith("gpuflow: error:")]
    assert f"run {run_dir.name} is lost: its instance i-" in line and "is no longer running" in line
    run = _runs(project, env)[run_dir.name]
    assert run["status"] == "lost" and "is no longer running" in run["lost_reason"]
    assert not (gpuflow_home / "sandbox" / cluster).exists()  # following did not re-create the instance's disk
    return run_dir.name


@pytest.mark.ssh
def test_run_over_ssh_ends_lost_when_the_cluster_is_downed_from_another_terminal(project, gpuflow_home, sshd):
    env = _environment({
        "GPUFLOW_SANDBOX_SSH": f"host=127.0.0.1,port={sshd.port},user={sshd.user},key={sshd.client_key},"
        f"host_key={sshd.directory / 'ssh_host_ed25519_key.pub'}",
    })

    def interrupt_a_follower(run_id: str) -> None:  # over SSH too, Ctrl-C ends `logs -f` (even `&`-ignored)
        following = _start(project, "logs", run_id, "-f", env=env, ignore_sigint=True)
        assert following.stdout.readline().startswith(b"line 0000 ")
        following.send_signal(signal.SIGINT)
        code, _out, err = _finish(following)
        assert code == 130 and err.strip().splitlines()[-1] == "gpuflow: error: interrupted", err

    assert _gpuflow(project, "up", "gone", "--sandbox", env=env).returncode == 0
    try:
        _assert_lost_when_downed_elsewhere(project, gpuflow_home, "gone", env, meanwhile=interrupt_a_follower)
    finally:
        _gpuflow(project, "down", "gone", "--yes", env=env)


def test_signals_end_run_and_logs_without_a_terminal_and_a_down_elsewhere_ends_run(project, gpuflow_home):
    env = _environment()
    assert _gpuflow(project, "up", "sig", "--sandbox", env=env).returncode == 0
    try:
        # SIGINT to `run` (stdin closed): it detaches, says how to reattach, exits 130; the job keeps running.
        running = _start(project, "run", "sig", "--", *job_args(100_000, 0.05), env=env)
        [run_dir] = _wait_for_job(gpuflow_home, "sig")
        running.send_signal(signal.SIGINT)
        code, _out, err = _finish(running)
        assert code == 130, err
        assert f"detached: run {run_dir.name} keeps running on sig" in err and "unexpected" not in err
        # SIGTERM to `run`: the same, with the exit code of SIGTERM.
        running = _start(project, "run", "sig", "--", *job_args(100_000, 0.05), env=env)
        run_dirs = _wait_for_job(gpuflow_home, "sig", count=2)
        running.send_signal(signal.SIGTERM)
        code, _out, err = _finish(running)
        assert code == 143, err
        assert "detached: run" in err

        # `logs -f`: SIGTERM, and SIGINT that a shell's `&` told it to ignore.
        for sent, ignore_sigint, expected in ((signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)):
            following = _start(project, "logs", run_dirs[0].name, "-f", env=env, ignore_sigint=ignore_sigint)
            first = following.stdout.readline()  # it is following: the log is arriving
            assert first.startswith(b"line 0000 ")
            following.send_signal(sent)
            code, _out, err = _finish(following)
            assert code == expected, (sent, ignore_sigint, err)
            assert err.strip().splitlines()[-1] in ("gpuflow: error: interrupted", "gpuflow: error: terminated")
        assert {run["status"] for run in _runs(project, env).values()} == {"running"}  # the jobs never noticed

        # And a `down` from another terminal ends a following `run`: lost, with the reason.
        followed = _assert_lost_when_downed_elsewhere(project, gpuflow_home, "sig", env)
        detached = {name: run for name, run in _runs(project, env).items() if name != followed}
        assert {run["status"] for run in detached.values()} == {"lost"}  # their cluster is gone
    finally:
        _gpuflow(project, "down", "sig", "--yes", env=env)


def test_run_up_down_tears_down_on_sigterm(project, gpuflow_home):
    """SIGTERM (a CI job cancelled) to `run --up --sandbox --down`: the job is
    stopped and the cluster torn down, as on Ctrl-C — nothing is left."""
    env = _environment()
    running = _start(project, "run", "--up", "--sandbox", "--down", "ci", "--", *job_args(100_000, 0.05), env=env)
    [run_dir] = _wait_for_job(gpuflow_home, "ci")
    job_pid = int((run_dir / "job.pid").read_text().split()[0])
    running.send_signal(signal.SIGTERM)
    code, _out, err = _finish(running)
    assert code == 143, err
    assert "tearing down cluster ci" in err
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        try:
            os.kill(job_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the job outlived its cluster")
    assert not (gpuflow_home / "sandbox" / "ci").exists()
