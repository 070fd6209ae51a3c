"""A sandbox cluster behind the loopback sshd, a small HTTP server on the "instance"'s loopback, and `gpuflow` as a process."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpuflow.procs import terminate_base
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore

REPO = Path(__file__).resolve().parents[2]
INSTANCE_ID = "i-0123456789abcdef0"


@pytest.fixture
def sandbox_cluster(gpuflow_home):
    """A sandbox cluster as `gpuflow up --sandbox` records it (its instance directory exists, as a running one's)."""
    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678",
        nodes=(Node(INSTANCE_ID, "running", public_ip="127.0.0.1"),), sandbox=True,
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    directory = gpuflow_home / "sandbox" / "box" / INSTANCE_ID
    directory.mkdir(parents=True)
    yield cluster
    terminate_base(str(directory))  # whatever a failed test left on the "instance" (a Jupyter server) ends with it


def sandbox_ssh_value(server) -> str:
    return (
        f"host=127.0.0.1,port={server.port},user={server.user},key={server.client_key},"
        f"host_key={server.directory / 'ssh_host_ed25519_key.pub'}"
    )


@pytest.fixture
def through_sshd(sandbox_cluster, sshd, monkeypatch):
    """The sandbox's instance is reached through a fresh loopback sshd (the test may drop its sessions)."""
    monkeypatch.setenv("GPUFLOW_SANDBOX_SSH", sandbox_ssh_value(sshd))
    return sshd


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = f"hello from the instance: {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def instance_http():
    """A small HTTP server on 127.0.0.1 (the "instance"'s loopback): its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def gpuflow_process():
    """Start gpuflow ARGS as a process (this checkout first on the path, the test's environment, a cloud that
    says the recorded instance runs: tests/tunnels/gpuflow_with_running_cloud.py); every process started is
    ended after the test."""
    started: list[subprocess.Popen] = []

    def start(*argv: str) -> subprocess.Popen:
        environment = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("gpuflow_with_running_cloud.py")), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=environment, cwd=REPO, start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


@pytest.fixture
def tensorboard_without_tensorflow(tmp_path, monkeypatch):
    """TensorBoard as its `tensorboard` extra installs it, without TensorFlow (its own reader; starts in a
    second instead of importing TensorFlow)."""
    hidden = tmp_path / "no-tensorflow"
    hidden.mkdir()
    (hidden / "tensorflow.py").write_text('raise ImportError("TensorFlow is hidden from this test\'s TensorBoard")\n')
    monkeypatch.setenv("PYTHONPATH", f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return hidden
