"""Benchmark: per-file cost of `gpuflow sync` and `rsync -az` at 1k/10k/50k small files, in one run.

Starts its own throwaway OpenSSH server on 127.0.0.1 (tests/sshd.py), builds
trees of small files (200 B - 4 kB of text each, 20 directories) and a
destination on tmpfs (/dev/shm when it exists: first syncs on a disk vary
2-5x from run to run for both tools), then for each size measures, the two
contenders taking turns: first sync (into a fresh directory), no-change
re-sync, one-change re-sync.  Prints the median with the range and the cost
per file in microseconds, so a reader sees both tools grow alike, and the
load average at the start and the end.  Then, per size: the peak resident
memory of a no-change re-sync (gpuflow's whole process, `/usr/bin/time -f %M`,
beside the interpreter's own with gpuflow.sync imported; the local rsync
process), and the bytes of the first sync's tar stream, plain and gzip level 1
(what a remote link would carry), with the CPU the compression takes.

    unshare -n sh -c 'ip link set lo up && python bench/sync_scale.py --sizes 1000,10000,50000'
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_bench import build_tree, rsync, tree_signature  # noqa: E402

from gpuflow.records import SSHTarget  # noqa: E402
from gpuflow.sync import SSHDestination, ssh_argv, sync_directory  # noqa: E402
from tests.sshd import SshServer  # noqa: E402


def alternate(contenders: dict, repeat: int, before=None) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for attempt in range(repeat):
        if before is not None:
            before(attempt)
        order = list(contenders) if attempt % 2 == 0 else list(reversed(contenders))
        for name in order:
            started = time.perf_counter()
            contenders[name](attempt)
            timings[name].append(time.perf_counter() - started)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma-separated file counts")
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    sizes = [int(text) for text in arguments.sizes.split(",")]
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="gpuflow-sync-scale-", dir=base))
    server = SshServer(work / "sshd").start()
    load_before = os.getloadavg()
    rows = []
    memory: list[tuple[int, int, int]] = []
    wire: list[tuple[int, int, int, float]] = []
    try:
        known_hosts = work / "known_hosts"
        known_hosts.write_text(server.known_hosts_line() + "\n")
        target = SSHTarget("127.0.0.1", server.port, server.user, str(server.client_key), str(known_hosts))
        for count in sizes:
            tree = work / f"tree-{count}"
            build_tree(tree, small_files=count, big_megabytes=0)
            remote = work / f"remote-{count}"
            remote.mkdir()

            def fresh(prefix: str, attempt: int) -> Path:
                path = remote / f"{prefix}-{attempt}"
                shutil.rmtree(path, ignore_errors=True)
                return path

            first = alternate(
                {
                    "gpuflow": lambda a: sync_directory(tree, SSHDestination(target, str(fresh("gf", a))), large_files=10**9),
                    "rsync": lambda a: rsync(target, tree, fresh("rs", a)),
                },
                arguments.repeat,
            )
            rows.append((f"first sync, {count:,} files", count, first))
            if tree_signature(remote / "gf-0") != tree_signature(tree):
                print(f"MISMATCH after the first sync of {count} files")
                return 2
            resync = {
                "gpuflow": lambda a: sync_directory(tree, SSHDestination(target, str(remote / "gf-0")), large_files=10**9),
                "rsync": lambda a: rsync(target, tree, remote / "rs-0"),
            }
            rows.append((f"no-change re-sync, {count:,}", count, alternate(resync, max(arguments.repeat, 5))))
            changed = tree / "pkg07" / "module_0007.py"

            def touch(attempt: int) -> None:
                changed.write_text(f"# edit {attempt}\n" + changed.read_text())
                stamp = time.time_ns() + (attempt + 1) * 2_000_000_000
                os.utime(changed, ns=(stamp, stamp))

            rows.append((f"one-change re-sync, {count:,}", count, alternate(resync, max(arguments.repeat, 5), touch)))
            if tree_signature(remote / "gf-0") != tree_signature(tree):
                print(f"MISMATCH after the re-syncs of {count} files")
                return 2
            memory.append((count, peak_kib(_GPUFLOW_RESYNC, str(tree), str(remote / "gf-0"), *_target_args(target)),
                           peak_kib("rsync", "-az", "-e", shlex.join(ssh_argv(target)), f"{tree}/",
                                    f"{target.host}:{remote / 'rs-0'}/")))
            wire.append((count, *stream_bytes(tree)))
            shutil.rmtree(remote, ignore_errors=True)
            shutil.rmtree(tree, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"sync at scale: loopback OpenSSH, tmpfs, {os.cpu_count()} CPUs, load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}; median [min-max] of the runs, contenders alternating")
    print(f"{'case':30} {'gpuflow s':>22} {'rsync -az s':>22} {'ratio':>6} {'gf us/file':>10} {'rs us/file':>10}")
    for case, count, timings in rows:
        ours, theirs = timings["gpuflow"], timings["rsync"]
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(f"{case:30} {mo:7.3f} [{min(ours):.2f}-{max(ours):.2f}] {mt:9.3f} [{min(theirs):.2f}-{max(theirs):.2f}] "
              f"{mo / mt:5.2f}x {mo / count * 1e6:10.0f} {mt / count * 1e6:10.0f}")
    interpreter = peak_kib(sys.executable, "-c", "import gpuflow.sync")
    print(f"\npeak memory of a no-change re-sync (KiB; the interpreter with gpuflow.sync imported: {interpreter:,})")
    print(f"{'files':>8} {'gpuflow':>9} {'gf-interp':>9} {'rsync':>8} {'gf B/file':>9}")
    for count, ours, theirs in memory:
        print(f"{count:8,} {ours:9,} {ours - interpreter:9,} {theirs:8,} {(ours - interpreter) * 1024 / count:9.0f}")
    print("\nfirst sync's tar stream: bytes plain, gzip level 1, compression CPU")
    for count, plain, packed, seconds in wire:
        print(f"{count:8,} {plain:12,} {packed:12,} ({plain / packed:.1f}x smaller) {seconds:.2f} CPU-s")
    return 0


_GPUFLOW_RESYNC = (
    "import sys; from gpuflow.records import SSHTarget; from gpuflow.sync import SSHDestination, sync_directory; "
    "t = SSHTarget(sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]); "
    "sync_directory(sys.argv[1], SSHDestination(t, sys.argv[2]), large_files=10**9)"
)


def _target_args(target: SSHTarget) -> list[str]:
    return [target.host, str(target.port), target.user, str(target.key_path), str(target.known_hosts_path)]


def peak_kib(*argv: str) -> int:
    """Peak resident memory (KiB) of a command: a Python snippet (``argv[0]`` holds ``import``) or a program."""
    command = [sys.executable, "-c", *argv] if "import" in argv[0] and argv[0] != sys.executable else list(argv)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    completed = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, check=True,
                               env=environment)
    return int(completed.stderr.strip().splitlines()[-1])


def stream_bytes(tree: Path) -> tuple[int, int, float]:
    """The tar stream of the whole tree: plain bytes, gzip level-1 bytes, CPU-s of the compression."""
    from gpuflow.sync import scan_source
    from gpuflow.sync.compress import GzipWriter
    from gpuflow.sync.transfer import stream_tar

    class Counter:
        total = 0

        def write(self, data) -> None:
            self.total += len(data)

    entries = scan_source(tree).entries
    plain = Counter()
    stream_tar(tree, entries, plain, None)
    packed = Counter()
    writer = GzipWriter(packed)
    started = time.process_time()
    stream_tar(tree, entries, writer, None)
    writer.close()
    return plain.total, packed.total, time.process_time() - started


if __name__ == "__main__":
    sys.exit(main())
