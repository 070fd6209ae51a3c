"""Targets for the run tests: a LocalRunner directory and the real loopback sshd.

The job is a tiny Python script (no TensorFlow): it prints numbered lines,
writes outputs under $GPUFLOW_OUTPUT_DIR, echoes its argv as JSON and exits
with the code it is given, so every behaviour of `run` is observable fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuflow.records import Cluster, SSHTarget
from gpuflow.jobs import RunTarget
from gpuflow.transport.local import LocalRunner

JOB_SCRIPT = """\
import json, os, sys, time
lines, delay, code = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
output_dir = os.environ["GPUFLOW_OUTPUT_DIR"]
os.makedirs(os.path.join(output_dir, "checkpoints"), exist_ok=True)
with open(os.path.join(output_dir, "checkpoints", "latest.bin"), "wb") as handle:
    handle.write(os.urandom(200_000))
with open(os.path.join(output_dir, "argv.json"), "w") as handle:
    json.dump(sys.argv[4:], handle)
with open(os.path.join(output_dir, "environment.json"), "w") as handle:
    json.dump({key: value for key, value in os.environ.items() if key.startswith(("AWS_", "GPUFLOW_"))}, handle)
for number in range(lines):
    print(f"line {number:04d} " + "x" * 60, flush=True)
    time.sleep(delay)
print("stderr says hi", file=sys.stderr, flush=True)
with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
    json.dump({"lines": lines}, handle)
sys.exit(code)
"""


def job_args(lines: int = 5, delay: float = 0.0, code: int = 0, *extra: str) -> list[str]:
    """The command after `--`: python job.py LINES DELAY CODE EXTRA..."""
    return ["python", "job.py", str(lines), str(delay), str(code), *extra]


def fake_cluster(name: str = "testbox") -> Cluster:
    return Cluster(
        name=name,
        region="us-east-1",
        instance_type="g5.xlarge",
        ami="ami-0123456789abcdef0",
        price_per_hour=1.006,
    )


def _push_project(connect, project_dir: Path) -> None:
    """A minimal stand-in for the sync helper: copy the project's top-level files."""
    runner = connect()
    try:
        for path in sorted(project_dir.iterdir()):
            if path.is_file():
                runner.put_bytes(path.read_bytes(), f"{runner.base_dir}/project/{path.name}")
    finally:
        runner.close()


@pytest.fixture
def project(tmp_path) -> Path:
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "job.py").write_text(JOB_SCRIPT)
    return directory


@pytest.fixture
def local_target(tmp_path) -> RunTarget:
    base = tmp_path / "instance"

    def connect() -> LocalRunner:
        return LocalRunner(base)

    return RunTarget(cluster=fake_cluster(), connect=connect, sync_project=lambda p: _push_project(connect, p))


@pytest.fixture
def ssh_connect(sshd, tmp_path):
    """A factory of SSHRunners to the loopback sshd (host key pinned, fast backoff)."""
    from gpuflow.transport.ssh import Backoff, SSHRunner

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    target = SSHTarget(
        host="127.0.0.1",
        port=sshd.port,
        user=sshd.user,
        key_path=str(sshd.client_key),
        known_hosts_path=str(known_hosts),
    )
    base = tmp_path / "ssh-instance"

    def connect() -> SSHRunner:
        return SSHRunner(target, base_dir=str(base), backoff=Backoff(retries=8, initial=0.1, maximum=1.0))

    return connect


@pytest.fixture
def ssh_target(ssh_connect) -> RunTarget:
    return RunTarget(
        cluster=fake_cluster(), connect=ssh_connect, sync_project=lambda p: _push_project(ssh_connect, p)
    )


@pytest.fixture(params=["local", "ssh"])
def target(request) -> RunTarget:
    """Each end-to-end test runs against both transports."""
    return request.getfixturevalue(f"{request.param}_target")
