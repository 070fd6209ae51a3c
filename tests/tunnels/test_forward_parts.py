"""The parts of `gpuflow forward` without sshd: port specs, local port choice, supervision, the sandbox relay."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from gpuflow.errors import InstanceGone, UnreachableHost, UsageError
from gpuflow.tunnels.forward import Backoff, RelayTunnel, TunnelFailed, forward_argv, plan_forward, supervise
from gpuflow.tunnels.ports import Forward, PortSpec, choose_forwards, parse_port_spec
from gpuflow.records import SSHTarget
from tests.waiting import wait_for


def test_port_specs():
    assert parse_port_spec("8888") == PortSpec(8888, None)
    assert parse_port_spec("6006:16006") == PortSpec(6006, 16006)
    for bad in ("", "0", "65536", "88a", "8888:", ":8888", "1:2:3", "-1", "8888; rm -rf /"):
        with pytest.raises(UsageError):
            parse_port_spec(bad)


def test_a_taken_local_port_becomes_the_next_free_one_said_once():
    said: list[str] = []
    taken = {8888, 8889}
    forwards = choose_forwards(
        [PortSpec(8888), PortSpec(6006, 8890), PortSpec(22, 2222)], say=said.append, is_free=lambda p: p not in taken
    )
    assert forwards == [Forward(8888, 8890), Forward(6006, 8891), Forward(22, 2222)]
    assert said == ["local port 8888 is taken: using 8890", "local port 8890 is taken: using 8891"]
    with pytest.raises(UsageError, match="no free local port"):
        choose_forwards([PortSpec(80)], say=said.append, is_free=lambda port: False)


def test_the_ssh_command_binds_loopback_on_both_ends_with_the_pinned_options(tmp_path):
    target = SSHTarget(host="203.0.113.9", port=22, user="ubuntu", key_path=str(tmp_path / "key"),
                       known_hosts_path=str(tmp_path / "known_hosts"))
    argv = forward_argv(target, [Forward(8888, 8890), Forward(6006, 6006)])
    assert argv[:3] == ["ssh", "-F", "none"]
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv and "ExitOnForwardFailure=yes" in argv
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "-L"] == [
        "127.0.0.1:8890:127.0.0.1:8888", "127.0.0.1:6006:127.0.0.1:6006"
    ]
    assert argv[-2] == "ubuntu@203.0.113.9" and "heartbeat" in argv[-1] and "-N" not in argv


class FakeTunnel:
    def __init__(self, script: list) -> None:
        self.script = script  # per start: TunnelFailed to raise, or the number of polls it stays up
        self.stopped = 0
        self.polls = 0

    def start(self) -> None:
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        self.polls = step

    def ended(self) -> str | None:
        if self.polls == 0:
            if not self.script:
                raise KeyboardInterrupt  # the user ends it
            return "connection reset"
        self.polls -= 1
        return None

    def stop(self) -> None:
        self.stopped += 1


def _supervise(tunnel, alive=lambda: True, said=None):
    said = [] if said is None else said
    ready: list[object] = []
    supervise(lambda: tunnel, describe="box", say=said.append, node_alive=alive, on_ready=ready.append,
              backoff=Backoff(first=1, cap=4), sleep=lambda seconds: said.append(f"sleep {seconds:g}"))
    return said, ready


def test_a_dropped_connection_is_reopened_with_backoff_and_stopped_at_the_end():
    tunnel = FakeTunnel([2, TunnelFailed("refused"), TunnelFailed("refused"), TunnelFailed("refused"), 1])
    with pytest.raises(KeyboardInterrupt):
        _supervise(tunnel)
    assert tunnel.stopped >= 5  # every ended one, and the last on the way out


def test_reconnection_waits_grow_to_the_cap():
    tunnel = FakeTunnel([0, TunnelFailed("a"), TunnelFailed("b"), TunnelFailed("c"), 0])
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _supervise(tunnel, said=said)
    assert [line for line in said if line.startswith("sleep 1") or line.startswith("sleep 2")
            or line.startswith("sleep 4")] == ["sleep 1", "sleep 2", "sleep 4", "sleep 4"]
    assert said[0] == "connection to box lost (connection reset); reconnecting in 1 s" and said[-1] == "reconnected to box"


def test_a_first_connection_that_fails_is_one_error_and_a_gone_node_ends_it():
    tunnel = FakeTunnel([TunnelFailed("Permission denied (publickey)")])
    with pytest.raises(UnreachableHost, match="cannot forward to box: Permission denied"):
        _supervise(tunnel)
    assert tunnel.stopped == 1
    tunnel = FakeTunnel([0, 5])
    with pytest.raises(InstanceGone, match="no longer running"):
        _supervise(tunnel, alive=lambda: False)
    assert tunnel.stopped >= 1


def test_a_sandbox_node_without_sshd_is_reached_by_a_loopback_relay(sandbox_cluster, instance_http, gpuflow_home):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        local = holder.getsockname()[1]
    forwards = [Forward(instance_http, local)]
    plan = plan_forward(sandbox_cluster, forwards, probe=_Running())
    tunnel = plan.open_tunnel()
    assert isinstance(tunnel, RelayTunnel)
    tunnel.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/relay", timeout=5) as response:
            assert response.read() == b"hello from the instance: /relay"
        with pytest.raises(OSError), socket.create_connection(("127.0.0.2", local), timeout=5):
            pass
        # The relay's heartbeat thread touches it once started: wait for it, never check a thread's work on arrival.
        wait_for((gpuflow_home / "sandbox" / "box" / sandbox_cluster.head.instance_id / "heartbeat").is_file,
                 what="the relay to touch the node's heartbeat")
        assert tunnel.ended() is None
    finally:
        tunnel.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", local), timeout=5):
        pass


class _Running:
    def instance_state(self, cluster, instance_id) -> str:
        return "running"

    def console_output(self, cluster, instance_id) -> str:
        return ""


def test_a_local_port_taken_on_the_first_connection_moves_and_on_a_reconnection_is_retried():
    from gpuflow.tunnels.forward import LocalPortTaken

    said: list[str] = []
    moved: list[int] = []
    first = FakeTunnel([LocalPortTaken("bind: Address already in use", 8888)])
    second = FakeTunnel([1, LocalPortTaken("bind: Address already in use", 8890), 1])
    opened = iter([first])

    def relisten(taken: LocalPortTaken):
        moved.append(taken.port)
        return lambda: second

    with pytest.raises(KeyboardInterrupt):
        supervise(lambda: next(opened), describe="box", say=said.append, node_alive=lambda: True, relisten=relisten,
                  backoff=Backoff(first=1, cap=4), sleep=lambda seconds: None)
    # The first connection's taken port moved once; the reconnection's was retried where it was (the URL in use).
    assert moved == [8888] and first.stopped == 1 and second.script == []
    assert "connection to box lost (bind: Address already in use); reconnecting in 2 s" in said

    with pytest.raises(UnreachableHost, match="cannot forward to box: .*in use"):
        supervise(lambda: FakeTunnel([LocalPortTaken("bind: Address already in use", 8888)]), describe="box",
                  say=said.append, node_alive=lambda: True, sleep=lambda seconds: None)  # no relisten: one error
