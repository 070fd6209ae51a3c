"""`gpuflow forward` end to end through the real loopback sshd: bytes, loopback only, reconnection, Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from gpuflow.procs import identity
from gpuflow.tunnels.ports import Forward
from gpuflow.tunnels.registry import TunnelKind, open_tunnels
from tests.tunnels.conftest import INSTANCE_ID
from tests.waiting import wait_for

pytestmark = pytest.mark.ssh


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def _lines(stream) -> list[str]:
    """The lines of ``stream`` as they come, read by a thread (a test never blocks on a pipe)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True).start()
    return lines


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    return [int(child) for child in found]


def _cmdline(pid: int) -> bytes:
    """A process's command line; empty once it has ended (a child listed a moment ago may be gone by now)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_forward_carries_bytes_binds_loopback_reconnects_and_ends_clean(
    through_sshd, instance_http, gpuflow_process, gpuflow_home
):
    # The HTTP server holds 127.0.0.1:PORT here, so the local port wanted (the same number) is taken.
    process = gpuflow_process("forward", "box", str(instance_http))
    url = process.stdout.readline().split()[0]
    local_port = int(url.rsplit(":", 1)[1].strip("/"))
    assert url == f"http://127.0.0.1:{local_port}/" and local_port != instance_http
    assert f"local port {instance_http} is taken: using {local_port}" in process.stderr.readline()
    said = _lines(process.stderr)

    assert _get(url + "first") == "hello from the instance: /first"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", local_port), timeout=5):
        pass  # bound to 127.0.0.1 only: another address of this very machine is refused

    ssh_pids = _children(process.pid)
    assert len(ssh_pids) == 1
    [recorded] = open_tunnels("box")  # what `gpuflow status box` lists
    assert (recorded.kind, recorded.pid, recorded.forwards) == (
        TunnelKind.FORWARD, process.pid, (Forward(instance_http, local_port),)
    )
    # A logged-in session (what the dead-man's switch counts as use), and the node's heartbeat touched.
    def logged_in() -> bool:
        return any(b"@notty" in _cmdline(pid) for pid in _children(through_sshd.process.pid))

    wait_for(logged_in, what="a logged-in session on the sshd")
    heartbeat = gpuflow_home / "sandbox" / "box" / INSTANCE_ID / "heartbeat"
    wait_for(heartbeat.is_file, what="the forward's session to touch the heartbeat")
    through_sshd.drop_sessions()  # the network drops the session mid-use
    assert wait_for(lambda: _get(url + "again"), timeout=60, what="the forward to reconnect") == (
        "hello from the instance: /again"
    )
    # Bytes pass as soon as the new ssh listens; the line follows once gpuflow has seen it listen.
    wait_for(lambda: any("reconnected to box" in line for line in said), what="gpuflow to say it reconnected")
    new_ssh = _children(process.pid)
    assert len(new_ssh) == 1 and new_ssh != ssh_pids
    ssh_identity = identity(new_ssh[0])

    os.kill(process.pid, signal.SIGINT)  # Ctrl-C
    assert process.wait(timeout=30) == 0
    assert identity(new_ssh[0]) != ssh_identity and identity(ssh_pids[0]) is None  # no ssh left behind
    wait_for(lambda: "forward ended\n" in said, what="the forward's last line")
    stderr = "".join(said)
    assert "lost" in stderr and "reconnected to box" in stderr and "Traceback" not in stderr
    assert _get(url) is None
    assert open_tunnels("box") == []


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_ends_the_forward_and_its_ssh(through_sshd, instance_http, gpuflow_process, signal_number):
    process = gpuflow_process("forward", "box", str(instance_http))
    url = process.stdout.readline().split()[0]
    assert _get(url) == "hello from the instance: /"
    (ssh_pid,) = _children(process.pid)
    ssh_identity = identity(ssh_pid)

    os.kill(process.pid, signal_number)  # SIGKILL runs no cleanup: the ssh ends with its parent all the same
    assert process.wait(timeout=30) == (0 if signal_number == signal.SIGTERM else -signal.SIGKILL)
    wait_for(lambda: identity(ssh_pid) != ssh_identity, timeout=30, what="the ssh to end")
