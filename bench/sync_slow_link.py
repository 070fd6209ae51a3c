"""Benchmark: a first sync over a slow link, plain vs gzip level 1 vs gpuflow's own choice, beside `rsync -az`.

There is no `tc` or `pv` here, so the link is a throttling relay: a small TCP
proxy (token bucket per direction, ``--rates`` in MB/s) in front of a
throwaway OpenSSH server (tests/sshd.py).  gpuflow and rsync reach the server
through the relay only, and the relay counts the bytes each run puts on the
wire.  The tree: small text files (200 B - 4 kB, 20 directories, as
bench/sync_scale.py), the destination on tmpfs.  Contenders alternate; median
[range] of ``--repeat`` first syncs each, into a fresh directory.

gpuflow never compresses towards a loopback address (nothing to save there),
so for its automatic choice to see a network link the relay listens on a
non-loopback address of the namespace's own loopback device:

    unshare -n sh -c 'ip link set lo up && ip addr add 10.77.0.1/32 dev lo &&
        python bench/sync_slow_link.py --relay-host 10.77.0.1'

(all traffic stays on the namespace's loopback device).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_bench import build_tree, rsync, tree_signature  # noqa: E402

from gpuflow.records import SSHTarget  # noqa: E402
from gpuflow.sync import SSHDestination, sync_directory  # noqa: E402
from tests.sshd import SshServer  # noqa: E402


class ThrottlingRelay:
    """A TCP relay from ``host:port`` to ``upstream`` that passes at most
    ``rate`` bytes per second in each direction (token bucket, 64 KiB burst)
    and counts what it passed."""

    BURST = 1 << 16

    def __init__(self, host: str, upstream: tuple[str, int], rate: float) -> None:
        self.upstream = upstream
        self.rate = rate
        self.wire_bytes = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.host, self.port = self._listener.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        tokens = float(self.BURST)
        last = time.monotonic()
        try:
            while True:
                data = source.recv(self.BURST)
                if not data:
                    break
                now = time.monotonic()
                tokens = min(float(self.BURST), tokens + (now - last) * self.rate)
                last = now
                tokens -= len(data)
                if tokens < 0:  # wait until the bucket has paid for these bytes
                    time.sleep(-tokens / self.rate)
                    last = time.monotonic()
                    tokens = 0.0
                sink.sendall(data)
                with self._lock:
                    self.wire_bytes += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rates", default="5,50", help="link speeds in MB/s, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--relay-host", default="127.0.0.1",
                        help="address the relay listens on (non-loopback: gpuflow's own choice sees a link)")
    arguments = parser.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="gpuflow-slow-link-", dir=base))
    server = SshServer(work / "sshd").start()
    tree = work / "tree"
    build_tree(tree, small_files=arguments.files, big_megabytes=0)
    load_before = os.getloadavg()
    results: list[tuple[float, str, list[float], list[int], str]] = []
    try:
        for rate_mb in (float(text) for text in arguments.rates.split(",")):
            relay = ThrottlingRelay(arguments.relay_host, ("127.0.0.1", server.port), rate_mb * 1e6)
            known_hosts = work / f"known_hosts-{relay.port}"
            key_type, key_body = server.host_public_key.split()[:2]
            known_hosts.write_text(f"[{relay.host}]:{relay.port} {key_type} {key_body}\n")
            target = SSHTarget(relay.host, relay.port, server.user, str(server.client_key), str(known_hosts))
            remote = work / f"remote-{rate_mb:g}"
            remote.mkdir()
            chose: list[str] = []

            def gpuflow(compress: bool | None):
                def run(attempt: int, name: str) -> None:
                    destination = remote / f"{name}-{attempt}"
                    report = sync_directory(tree, SSHDestination(target, str(destination)), large_files=10**9,
                                            compress=compress)
                    if compress is None:
                        chose.append("gzip" if report.compressed else "plain")
                return run

            contenders = {
                "gpuflow plain": gpuflow(False),
                "gpuflow gzip-1": gpuflow(True),
                "gpuflow auto": gpuflow(None),
                "rsync -az": lambda attempt, name: rsync(target, tree, remote / f"{name}-{attempt}"),
            }
            timings: dict[str, list[float]] = {name: [] for name in contenders}
            wire: dict[str, list[int]] = {name: [] for name in contenders}
            for attempt in range(arguments.repeat):
                order = list(contenders) if attempt % 2 == 0 else list(reversed(contenders))
                for name in order:
                    slug = name.replace(" ", "_")
                    before = relay.wire_bytes
                    started = time.perf_counter()
                    contenders[name](attempt, slug)
                    timings[name].append(time.perf_counter() - started)
                    wire[name].append(relay.wire_bytes - before)
                    if tree_signature(remote / f"{slug}-{attempt}") != tree_signature(tree):
                        print(f"MISMATCH after {name}")
                        return 2
                    shutil.rmtree(remote / f"{slug}-{attempt}")
            relay.close()
            for name in contenders:
                note = f"chose {'/'.join(sorted(set(chose)))}" if name == "gpuflow auto" else ""
                results.append((rate_mb, name, timings[name], wire[name], note))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"first sync of {arguments.files:,} small files through a throttling relay on {arguments.relay_host}; "
          f"{os.cpu_count()} CPUs, load {load_before[0]:.1f} -> {load_after[0]:.1f}; median [min-max], alternating")
    print(f"{'link':>8} {'contender':16} {'seconds':>22} {'MB on the wire':>15}")
    for rate_mb, name, seconds, wire_bytes, note in results:
        print(f"{rate_mb:6g}MB/s {name:16} {statistics.median(seconds):7.2f} [{min(seconds):.2f}-{max(seconds):.2f}]"
              f"      {statistics.median(wire_bytes) / 1e6:10.1f}   {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
