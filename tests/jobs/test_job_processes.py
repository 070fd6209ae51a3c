"""A run's processes: only what is proven to be the run is ever signalled, and
no AWS credential variable reaches a job (sandbox and real SSH alike)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpuflow import jobs, nodes, procs
from gpuflow.records import Node, SSHTarget
from gpuflow.jobs import RunTarget
from tests.jobs.conftest import _push_project, fake_cluster, job_args
from tests.sshd import SshServer, sshd_available

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def _alive(process: subprocess.Popen) -> bool:
    return process.poll() is None


@pytest.fixture
def stranger():
    """An unrelated process leading its own session and group (as a job did)."""
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def _with_other_start_time(recorded: str) -> str:
    """The same pid's identity as an earlier process holding that pid would have had."""
    head, _, ticks = recorded.rpartition(":")
    return f"{head}:{int(ticks) - 1}"


# --- identity -------------------------------------------------------------------------------


def test_identity_is_stable_while_the_process_lives_and_none_after(stranger):
    first = procs.identity(stranger.pid)
    assert first is not None and first.startswith("linux:")
    assert procs.identity(stranger.pid) == first
    assert procs.identity(os.getpid()) != first
    stranger.kill()
    stranger.wait()
    assert procs.identity(stranger.pid) is None


def test_a_zombie_has_no_identity():
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # exited, not yet waited for: a zombie
        state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.02)
    assert procs.identity(child.pid) is None
    child.wait()


def test_without_proc_the_identity_comes_from_ps(stranger, monkeypatch):
    """macOS has no /proc: `ps -o lstart=` gives the start time there (and here)."""
    real_isdir = os.path.isdir
    monkeypatch.setattr(procs.os.path, "isdir", lambda path: False if path == "/proc/self" else real_isdir(path))
    first = procs.identity(stranger.pid)
    assert first is not None and first.startswith("ps:") and len(first) > len("ps:Mon Nov 30 10:00:00 2026") - 3
    assert procs.identity(stranger.pid) == first
    stranger.kill()
    stranger.wait()
    assert procs.identity(stranger.pid) is None


def test_a_record_proves_only_the_process_it_was_taken_from(stranger, tmp_path):
    path = tmp_path / "job.proc"
    assert procs.record(str(path), stranger.pid)
    assert procs.proven(str(path)) == stranger.pid
    pid, recorded = path.read_text().strip().split(" ", 1)
    path.write_text(f"{pid} {_with_other_start_time(recorded)}\n")
    assert procs.proven(str(path)) is None
    for garbage in ("", f"{pid}", "abc linux:x:1", f"{pid}\n"):
        path.write_text(garbage)
        assert procs.proven(str(path)) is None


# --- nothing but the run is signalled -------------------------------------------------------


def test_terminating_a_sandbox_instance_spares_a_process_that_reused_a_recorded_pid(stranger, gpuflow_home):
    """A finished run's pid files name a pid that an unrelated process holds now."""
    cluster, node = fake_cluster("c1"), Node("i-0abc", "running")
    run_dir = nodes.sandbox_directory(cluster, node) / "runs" / "20260101-000000-abcd"
    run_dir.mkdir(parents=True)
    identity = procs.identity(stranger.pid)
    for name in ("job", "supervisor"):
        (run_dir / f"{name}.pid").write_text(f"{stranger.pid}\n")
        (run_dir / f"{name}.proc").write_text(f"{stranger.pid} {_with_other_start_time(identity)}\n")
    (run_dir / "exit_code").write_text("0\n")

    nodes.discard_sandbox_node(cluster, node)

    time.sleep(0.2)
    assert _alive(stranger)
    assert not nodes.sandbox_directory(cluster, node).exists()


def test_stop_and_status_spare_a_process_that_reused_the_jobs_pid(local_target, project, stranger):
    """The supervisor died with its job (no exit code), and the job's pid went to another process."""
    runner = local_target.connect()
    run_dir = Path(runner.base_dir) / "runs" / "20260101-000000-abcd"
    run_dir.mkdir(parents=True)
    (run_dir / "job.pid").write_text(f"{stranger.pid}\n")
    (run_dir / "job.proc").write_text(f"{stranger.pid} {_with_other_start_time(procs.identity(stranger.pid))}\n")

    status = json.loads(runner.run([sys.executable, "-c", jobs.scripts.RUN_STATUS_PY, str(run_dir)]).stdout)
    assert status[str(run_dir)]["alive"] is False
    assert jobs.stop_job(runner, str(run_dir), grace_seconds=1) == "gone"
    time.sleep(0.2)
    assert _alive(stranger)


_PID_REUSE_SCRIPT = textwrap.dedent(
    """
    import io, json, os, subprocess, sys, time
    from pathlib import Path
    from gpuflow import jobs, nodes
    from gpuflow.records import Node
    from gpuflow.jobs import RunTarget
    from gpuflow.transport.local import LocalRunner
    from tests.jobs.conftest import fake_cluster

    if not os.path.exists("/proc/sys/kernel/ns_last_pid"):
        sys.exit(77)
    home = Path(os.environ["GPUFLOW_HOME"])
    project = Path(sys.argv[1])
    cluster, node = fake_cluster("reuse"), Node("i-0123456789abcdef0", "running")
    base = nodes.sandbox_directory(cluster, node)
    target = RunTarget(cluster=cluster, connect=lambda: LocalRunner(base))
    outcome = jobs.run(target, project_dir=project, module=None, args=["sleep", "0.2"], out=io.BytesIO(),
                       detach=True, heartbeat_seconds=0.2)
    run_dir = Path(outcome.record.remote_dir)
    deadline = time.monotonic() + 30
    while not (run_dir / "exit_code").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job_pid = int((run_dir / "job.pid").read_text())
    supervisor_pid = int((run_dir / "supervisor.pid").read_text())

    def in_use(pid):  # a pid is not handed out again while a process, group or session holds it
        for name in os.listdir("/proc"):
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if name == str(pid) or pid in (int(fields[2]), int(fields[3])):
                return True
        return False

    while time.monotonic() < deadline and (in_use(job_pid) or in_use(supervisor_pid)):
        try:  # this script is the namespace's init: the orphaned supervisor's zombie is ours to reap
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)

    def with_pid(pid):  # the kernel hands out pid (last + 1) next, in this private namespace
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
            handle.write(str(pid - 1))
        return subprocess.Popen(["sleep", "120"], start_new_session=True)

    strangers = [with_pid(job_pid), with_pid(supervisor_pid)]
    result = {"reused": [process.pid for process in strangers] == [job_pid, supervisor_pid],
              "pids": [job_pid, supervisor_pid, *(process.pid for process in strangers)]}
    (run_dir / "exit_code").unlink()  # as if the supervisor had died with its job: nothing says it ended
    runner = LocalRunner(base)
    status = json.loads(runner.run([sys.executable, "-c", jobs.scripts.RUN_STATUS_PY, str(run_dir)]).stdout)
    result["status_alive"] = status[str(run_dir)]["alive"]
    result["stop"] = jobs.stop_job(runner, str(run_dir), grace_seconds=1)
    result["after_stop"] = [process.poll() is None for process in strangers]
    nodes.discard_sandbox_node(cluster, node)
    time.sleep(0.2)
    result["after_discard"] = [process.poll() is None for process in strangers]
    result["directory_left"] = base.exists()
    for process in strangers:
        process.kill()
    print(json.dumps(result))
    """
)


def test_a_pid_reused_in_a_private_pid_namespace_is_never_signalled(project, gpuflow_home, tmp_path):
    """The real supervisor runs a job that ends; its pid and its supervisor's are
    then handed to unrelated processes (forced through ns_last_pid in a private
    pid namespace).  `runs`, `stop` and a sandbox termination leave them alone."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private pid namespace")
    script = tmp_path / "reuse.py"
    script.write_text(_PID_REUSE_SCRIPT)
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT), "GPUFLOW_HOME": str(gpuflow_home)}
    completed = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script), str(project)],
        capture_output=True, text=True, timeout=120, env=environment, cwd=REPOSITORY_ROOT,
    )
    if completed.returncode == 77 or "Operation not permitted" in completed.stderr:
        pytest.skip(f"no private pid namespace with ns_last_pid here: {completed.stderr.strip()[-200:]}")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["reused"] is True, result
    assert result["status_alive"] is False
    assert result["stop"] == "gone"
    assert result["after_stop"] == [True, True]
    assert result["after_discard"] == [True, True]
    assert result["directory_left"] is False


# --- no credential reaches a job --------------------------------------------------------------

CREDENTIAL_CHAIN = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE12",
    "AWS_SECRET_ACCESS_KEY": "secret",
    "AWS_SESSION_TOKEN": "session",
    "AWS_SECURITY_TOKEN": "security",
    "AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z",
    "AWS_PROFILE": "work",
    "AWS_DEFAULT_PROFILE": "work",
    "AWS_SHARED_CREDENTIALS_FILE": "/tmp/credentials",
    "AWS_CONFIG_FILE": "/tmp/config",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN": "container-token",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/tmp/container-token",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/tmp/web-identity-token",
    "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/trainer",
    "AWS_ROLE_SESSION_NAME": "laptop",
    "AWS_BEARER_TOKEN_BEDROCK": "bearer",
    "AWS_SOME_FUTURE_CREDENTIAL": "future",
}


def _job_aws_variables(outcome) -> dict[str, str]:
    environment = json.loads((Path(outcome.record.local_dir) / "outputs" / "environment.json").read_text())
    return {key: value for key, value in environment.items() if key.startswith("AWS_")}


def test_no_credential_variable_reaches_a_sandbox_job(local_target, project, monkeypatch):
    for key, value in CREDENTIAL_CHAIN.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    outcome = jobs.run(local_target, project_dir=project, module=None, args=job_args(1), out=io.BytesIO())
    assert outcome.exit_code == 0
    assert _job_aws_variables(outcome) == {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.ssh
def test_no_credential_variable_reaches_a_job_started_over_ssh(project, tmp_path):
    """On a real instance the SSH session may carry variables (here: the
    server's SetEnv); the supervisor drops them before starting the job."""
    if not sshd_available():
        pytest.fail("OpenSSH server not installed: run `apt-get install -y openssh-server rsync` (.ci/run does)")
    from gpuflow.transport.ssh import Backoff, SSHRunner

    settings = " ".join(f"{key}={value}" for key, value in {**CREDENTIAL_CHAIN, "AWS_REGION": "eu-west-1"}.items())
    server = SshServer(tmp_path / "sshd", extra_config=(f"SetEnv {settings}",)).start()
    try:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(server.known_hosts_line() + "\n")
        ssh_target = SSHTarget(host="127.0.0.1", port=server.port, user=server.user,
                               key_path=str(server.client_key), known_hosts_path=str(known_hosts))

        def connect() -> SSHRunner:
            return SSHRunner(ssh_target, base_dir=str(tmp_path / "instance"), backoff=Backoff(retries=3, initial=0.1))

        session = connect()
        try:  # the session really carries them: the test would notice a leak
            assert "AWS_ROLE_ARN=arn:aws:iam::123456789012:role/trainer" in session.run(["env"]).text()
        finally:
            session.close()
        target = RunTarget(cluster=fake_cluster(), connect=connect, sync_project=lambda p: _push_project(connect, p))
        outcome = jobs.run(target, project_dir=project, module=None, args=job_args(1), out=io.BytesIO())
    finally:
        server.stop()
    assert outcome.exit_code == 0
    assert _job_aws_variables(outcome) == {"AWS_REGION": "eu-west-1"}


def test_stop_of_a_run_whose_pid_went_to_another_process_says_gone_and_marks_it_lost(local_target, project, stranger):
    outcome = jobs.run(local_target, project_dir=project, module=None, args=job_args(100000, 0.05),
                       out=io.BytesIO(), detach=True, heartbeat_seconds=0.2)
    run_dir = Path(outcome.record.remote_dir)
    supervisor_pid = int((run_dir / "supervisor.pid").read_text())
    job_pid = int((run_dir / "job.pid").read_text())
    os.killpg(supervisor_pid, signal.SIGKILL)  # the supervisor and its job die together (OOM killer, ...)
    os.killpg(job_pid, signal.SIGKILL)
    # ... and the job's pid now names another process (as the kernel may hand it out again)
    (run_dir / "job.pid").write_text(f"{stranger.pid}\n")
    (run_dir / "job.proc").write_text(f"{stranger.pid} {_with_other_start_time(procs.identity(stranger.pid))}\n")

    record, result = jobs.stop(outcome.record.run_id, grace_seconds=1, resolve=lambda name: local_target)

    assert result == "gone"
    assert record.status == "lost" and jobs.load_record(record.run_id).status == "lost"
    time.sleep(0.2)
    assert _alive(stranger)
