"""The tunnels open on this machine: recorded with their process identity, stale records dropped."""

from __future__ import annotations

import os

from gpuflow.procs import identity
from gpuflow.tunnels.ports import Forward
from gpuflow.tunnels.registry import OpenTunnel, TunnelKind, _store, describe, open_tunnels, registered


def test_a_tunnel_is_listed_while_held_and_a_stale_or_reused_pid_is_not(gpuflow_home):
    with registered("box", "i-1", TunnelKind.FORWARD, [Forward(8888, 8890)]) as held:
        assert open_tunnels("box") == [held] and open_tunnels("other") == []
        assert describe([held]) == [f"open forward: http://127.0.0.1:8890/ -> port 8888 on i-1 (gpuflow pid {os.getpid()})"]
    assert open_tunnels("box") == []
    # A record whose pid now names another process (or none) is not an open tunnel, and is removed.
    reused = OpenTunnel("box", "i-1", TunnelKind.NOTEBOOK, (Forward(1, 2),), os.getpid(), "linux:other:1", "u")
    _store().put("12345", reused.to_dict())
    assert identity(os.getpid()) != reused.identity
    assert open_tunnels() == [] and _store().names() == []
