"""The SSH runner's TCP socket sends small packets at once (TCP_NODELAY), as OpenSSH's does.

Without it, Nagle's algorithm holds a small SSH message (a channel's EOF, a request) while an
earlier segment waits for the peer's delayed ACK (40 ms on Linux): every command that ends by
closing its stdin paid that stall, ~0.15 s of a 0.72 s `gpuflow run` on loopback
(bench/roundtrip_bench.py, README "Benchmarks")."""

from __future__ import annotations

import socket

from gpuflow.transport.ssh import SSHRunner
from tests.transport.conftest import target_for


def test_the_runner_connection_has_tcp_nodelay(tmp_path, sshd_session, pinned_known_hosts):
    with SSHRunner(target_for(sshd_session, pinned_known_hosts), base_dir=str(tmp_path / "base")) as runner:
        assert runner.run(["echo", "ok"]).stdout == b"ok\n"
        sock = runner._connection().get_transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # and again after a reconnection (a new socket, made the same way)
        runner._drop_connection()
        assert runner.run(["echo", "again"]).stdout == b"again\n"
        sock = runner._connection().get_transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
