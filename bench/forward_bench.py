"""Benchmark: `gpuflow forward`'s transport, OpenSSH ``ssh -L`` against a paramiko ``direct-tcpip`` relay.

The measurement behind README's "Why OpenSSH and not paramiko's direct-tcpip".
Starts a throwaway OpenSSH server on 127.0.0.1 (tests/sshd.py) and a small TCP
server on 127.0.0.1 standing for a server on the instance (``b``: it sends
``--megabytes`` MB and closes; ``p``: it answers one byte).  Then, the two
contenders taking turns ``--repeat`` times:

1. ``ssh -L`` exactly as `gpuflow forward` runs it
   (:func:`gpuflow.tunnels.forward.forward_argv`, :class:`~gpuflow.tunnels.forward.SSHTunnel`:
   pinned host key, the key, ``BatchMode``, ``ExitOnForwardFailure``);
2. paramiko: one ``Transport`` (key, pinned host key) and a relay in this
   process: a local listener whose every connection is a ``direct-tcpip``
   channel, pumped by two threads.

It prints, per contender, the median and range of: the set-up (start until the
local port listens), the bulk download through the forward, and a new
connection's round trip (connect, one byte there and back). Run it in a
loopback-only namespace:

    unshare -n sh -c 'ip link set lo up && python3 bench/forward_bench.py'
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import socketserver
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from tests.sshd import SshServer, free_port  # noqa: E402

CHUNK = b"\0" * (1 << 16)


class _Instance(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    megabytes = 100


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        asked = self.request.recv(1)
        if asked == b"p":
            self.request.sendall(b"p")
        elif asked == b"b":
            for _ in range(self.server.megabytes * 16):  # 64 KB chunks
                self.request.sendall(CHUNK)


def _download(port: int) -> int:
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(b"b")
        while data := connection.recv(1 << 20):
            received += len(data)
    return received


def _ping(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"p")
        assert connection.recv(1) == b"p"


class ParamikoRelay:
    """What `gpuflow forward` would be with paramiko: one Transport, a relay thread per connection."""

    def __init__(self, server: SshServer, remote: int, local: int) -> None:
        self.server, self.remote, self.local = server, remote, local
        self.transport = None
        self.listener: socket.socket | None = None

    def start(self) -> None:
        import paramiko

        key = paramiko.Ed25519Key.from_private_key_file(str(self.server.client_key))
        host_key = paramiko.Ed25519Key(data=__import__("base64").b64decode(self.server.host_public_key.split()[1]))
        self.transport = paramiko.Transport(("127.0.0.1", self.server.port))
        self.transport.connect(hostkey=host_key, username=self.server.user, pkey=key)
        self.transport.set_keepalive(15)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.local))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, address = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client, address), daemon=True).start()

    def _relay(self, client: socket.socket, address) -> None:  # noqa: ANN001
        channel = self.transport.open_channel("direct-tcpip", ("127.0.0.1", self.remote), address)

        def pump(source, sink) -> None:  # noqa: ANN001
            try:
                while data := source.recv(1 << 16):
                    sink.sendall(data)
            except OSError:
                pass
            try:
                sink.shutdown(socket.SHUT_WR) if isinstance(sink, socket.socket) else sink.shutdown_write()
            except OSError:
                pass

        back = threading.Thread(target=pump, args=(channel, client), daemon=True)
        back.start()
        pump(client, channel)
        back.join()
        channel.close()
        client.close()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.transport is not None:
            self.transport.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=100)
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpuflow-fwd-"))
    server = SshServer(work / "sshd").start()
    instance = _Instance(("127.0.0.1", 0), _Handler)
    instance.megabytes = arguments.megabytes
    threading.Thread(target=instance.serve_forever, daemon=True).start()
    remote = instance.server_address[1]
    try:
        from gpuflow.records import SSHTarget
        from gpuflow.transport import hostkeys
        from gpuflow.tunnels.forward import SSHTunnel, forward_argv
        from gpuflow.tunnels.ports import Forward

        known_hosts = work / "known_hosts"
        hostkeys.pin_host_keys(known_hosts, "127.0.0.1", server.port,
                               [hostkeys.parse_public_key(server.host_public_key)])
        target = SSHTarget("127.0.0.1", server.port, server.user, str(server.client_key), str(known_hosts))

        def openssh(local: int):  # noqa: ANN202
            forwards = [Forward(remote, local)]
            return SSHTunnel(forward_argv(target, forwards, str(work / "remote")), forwards)

        contenders: dict[str, Callable[[int], object]] = {
            "ssh -L": openssh, "paramiko direct-tcpip": lambda local: ParamikoRelay(server, remote, local),
        }
        results = {name: {"set-up": [], "download": [], "new connection": []} for name in contenders}
        names = list(contenders)
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        for attempt in range(arguments.repeat):
            shift = attempt % len(names)
            for name in names[shift:] + names[:shift]:  # rotate who goes first
                local = free_port()
                started = time.perf_counter()
                tunnel = contenders[name](local)
                tunnel.start()
                results[name]["set-up"].append(time.perf_counter() - started)
                try:
                    _ping(local)  # warm: the first channel
                    started = time.perf_counter()
                    assert _download(local) == arguments.megabytes << 20
                    results[name]["download"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    for _ in range(10):
                        _ping(local)
                    results[name]["new connection"].append((time.perf_counter() - started) / 10)
                finally:
                    tunnel.stop()
        for name, measures in results.items():
            print(name)
            for measure, values in measures.items():
                print(f"  {measure:15s} median {statistics.median(values) * 1000:8.1f} ms  "
                      f"range {min(values) * 1000:.1f}-{max(values) * 1000:.1f} ms")
        print(f"({arguments.megabytes} MB downloaded; a new connection: connect + one byte there and back, "
              f"mean of 10)\nload average at end: {os.getloadavg()[0]:.1f}")
    finally:
        instance.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
