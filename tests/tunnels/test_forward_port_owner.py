"""A forward is up only once its own ssh listens on the local port: a port another process holds meanwhile (taken
after it was chosen, or during a reconnection's wait) is a failed start, never a forward said to be up; a first
connection that fails is one error line (exit 6)."""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest

from gpuflow.tunnels.forward import TunnelFailed, plan_forward
from gpuflow.tunnels.ports import Forward, listens_on
from tests.tunnels.gpuflow_with_running_cloud import RunningCloud


@pytest.mark.ssh
def test_a_port_another_process_holds_is_not_taken_for_the_forward(through_sshd, sandbox_cluster, instance_http):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        tunnel = plan_forward(sandbox_cluster, [Forward(instance_http, port)], probe=RunningCloud()).open_tunnel()
        try:
            with pytest.raises(TunnelFailed, match="(?i)address already in use|forwarding|bind"):
                tunnel.start()
        finally:
            tunnel.stop()


@pytest.mark.ssh
def test_the_forward_is_up_once_its_ssh_listens(through_sshd, sandbox_cluster, instance_http):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    tunnel = plan_forward(sandbox_cluster, [Forward(instance_http, port)], probe=RunningCloud()).open_tunnel()
    tunnel.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/owner", timeout=10) as response:
            assert response.read() == b"hello from the instance: /owner"
        assert tunnel.ended() is None
    finally:
        tunnel.stop()


def test_who_listens_on_a_port():
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        port = mine.getsockname()[1]
        assert listens_on(os.getpid(), port) is False  # bound, not listening
        mine.listen(1)
        assert listens_on(os.getpid(), port) is True
        assert listens_on(1, port) is False  # another process: not its socket
    assert listens_on(os.getpid(), port) is False


@pytest.mark.ssh
def test_a_first_connection_that_fails_is_one_error_line_exit_6(through_sshd, sandbox_cluster, monkeypatch, capsys):
    from gpuflow import clusters
    from gpuflow.cli import app, run_app

    monkeypatch.setattr(clusters, "cloud_probe", lambda provisioner_factory=None: RunningCloud())
    through_sshd.stop()  # the instance runs, its sshd does not answer
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]

    assert run_app(app, ["forward", "box", str(port)]) == 6

    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("gpuflow: error:")]
    assert len(errors) == 1 and "cannot forward to box" in errors[0] and "Traceback" not in captured.err
    assert captured.out == ""  # no URL was printed for a forward that never came up


LISTENER = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(1); time.sleep(60)"


@pytest.mark.parametrize("owner_known", [True, False], ids=["proc", "no-proc"])
def test_the_tunnel_is_up_when_its_process_listens(monkeypatch, owner_known):
    import sys

    from gpuflow.tunnels import forward

    if not owner_known:  # a machine without /proc (macOS): judged by the port no longer free
        monkeypatch.setattr(forward, "listens_on", lambda pid, port: None)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    tunnel = forward.SSHTunnel([sys.executable, "-c", LISTENER, str(port)], [Forward(1, port)], ready_seconds=60)
    try:
        tunnel.start()
        assert tunnel.ended() is None and not forward.port_is_free(port)
    finally:
        tunnel.stop()
    assert forward.port_is_free(port)
