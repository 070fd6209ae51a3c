"""`gpuflow ssh NAME -- CMD` as a process: the common case execs ssh before the CLI is imported
(gpuflow.ssh_fast), with exactly the command line the full command builds; the rest goes to the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuflow import nodes
from gpuflow.transport import hostkeys
from tests.sshd import SshServer
from tests.test_nodes import make_cluster

pytestmark = pytest.mark.ssh

REPOSITORY = Path(__file__).resolve().parents[2]
HOSTILE = ["$(touch pwned)", "; touch pwned", "a && b", "'q\"", "*", "ü ✓"]
PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


@pytest.fixture
def server(tmp_path):
    home = tmp_path / "remote-home"
    home.mkdir()
    started = SshServer(tmp_path / "sshd", extra_config=(f"SetEnv HOME={home}",)).start()
    yield started
    started.stop()


def _gpuflow(*argv: str, importtime: bool = False) -> subprocess.CompletedProcess:
    python = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "gpuflow"]
    return subprocess.run([*python, *argv], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY)})


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_the_common_case_execs_ssh_without_the_cli_and_arguments_arrive_literally(server, gpuflow_home, tmp_path):
    cluster = make_cluster(server)
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", server.port,
                           [hostkeys.parse_public_key(server.host_public_key)])
    done = _gpuflow("ssh", cluster.name, "--", "python3", "-c", PRINT_ARGV, *HOSTILE, importtime=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == HOSTILE
    imported = _imported(done.stderr)
    assert not imported & {"typer", "rich", "gpuflow.cli", "gpuflow.nodes", "boto3", "paramiko"}
    assert (tmp_path / "remote-home" / "gpuflow" / "heartbeat").is_file()  # touched, as by the full command
    assert _gpuflow("ssh", cluster.name, "--", "sh", "-c", "exit 7").returncode == 7


def test_anything_else_goes_to_the_full_cli(server, gpuflow_home):
    cluster = make_cluster(server)  # no host key pinned yet: the full command reads the console
    done = _gpuflow("ssh", cluster.name, "--", "true", importtime=True)
    assert "gpuflow.cli" in _imported(done.stderr)
    assert _gpuflow("ssh", "no-such-cluster", "--", "true").returncode != 0
    with_option = _gpuflow("ssh", cluster.name, "--node", "i-nope", "--", "true")
    assert with_option.returncode != 0 and "i-nope" in with_option.stderr and "Traceback" not in with_option.stderr
