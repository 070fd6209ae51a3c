"""Benchmark: 1 MB changed inside a 1 GB file, `gpuflow sync` (block delta) against `rsync -az`.

Starts its own throwaway OpenSSH server on 127.0.0.1 (tests/sshd.py), writes one
random file (``--size-mb``, 1024; in a temp directory on the disk, hot in the page
cache) and a copy for each contender's destination on a tmpfs (``/dev/shm`` when it
has room: the disk's speed varies too much here), then ``--repeat`` rounds: each
round rewrites 1 MB in the middle of the source (new random bytes, not aligned
to a block, the mtime moved on) and re-syncs it, the contenders taking turns,
each into its own destination (which holds the previous version its own tool
wrote, so each sync sees exactly one changed MB, as a user re-syncing a
fine-tuned checkpoint).  gpuflow's first round is "cold" (the destination copy
was not placed by gpuflow: its blocks are hashed there) and reported apart;
the later rounds use the block list gpuflow kept there.  gpuflow is timed
in-process (``sync_directory``: scan, listing, plan, block delta); rsync as the
subprocess a user would run, with the same pinned-key ssh options.  Prints
medians and ranges, the ratio, and the bytes each put on the wire; checks each
destination equals the source.  Everything is removed at the end.

    unshare -n sh -c 'ip link set lo up && python bench/delta_bench.py --repeat 5'
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuflow.records import SSHTarget  # noqa: E402
from gpuflow.sync import SSHDestination, blockdelta, ssh_argv, sync_directory  # noqa: E402
from tests.sshd import SshServer  # noqa: E402

_SENT = re.compile(r"Total bytes sent: ([\d,]+)")
MB = 1 << 20


def rsync(target: SSHTarget, source: Path, destination: Path) -> int:
    """``rsync -az`` of the tree; the bytes it sent."""
    completed = subprocess.run(
        ["rsync", "-az", "--stats", "-e", shlex.join(ssh_argv(target)), f"{source}/", f"{target.host}:{destination}/"],
        capture_output=True,
        text=True,
        check=True,
    )
    match = _SENT.search(completed.stdout)
    return int(match.group(1).replace(",", "")) if match else -1


def digest(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--where", default="/dev/shm", help="where the file pair lives (a tmpfs)")
    arguments = parser.parse_args()
    size = arguments.size_mb * MB
    where = arguments.where if shutil.disk_usage(arguments.where).free > 3 * size + (1 << 30) else None
    work = Path(tempfile.mkdtemp(prefix="gpuflow-delta-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="gpuflow-delta-bench-", dir=where))
    server = SshServer(work / "sshd").start()
    try:
        known_hosts = work / "known_hosts"
        known_hosts.write_text(server.known_hosts_line() + "\n")
        target = SSHTarget("127.0.0.1", server.port, server.user, str(server.client_key), str(known_hosts))
        source, ours_dir, theirs_dir = work / "source", shm / "gpuflow", shm / "rsync"
        for directory in (source, ours_dir, theirs_dir):
            directory.mkdir()
        with (source / "model.weights").open("wb") as handle:
            for _ in range(arguments.size_mb):
                handle.write(os.urandom(MB))
        shutil.copy2(source / "model.weights", ours_dir / "model.weights")
        shutil.copy2(source / "model.weights", theirs_dir / "model.weights")
        destination = SSHDestination(target, str(ours_dir))
        assert sync_directory(source, destination).files_sent == 0

        outcomes = []
        original = blockdelta.send_block_deltas

        def recording(*args, **kwargs):
            outcome = original(*args, **kwargs)
            outcomes.append(outcome)
            return outcome

        blockdelta.send_block_deltas = recording
        times: dict[str, list[float]] = {"gpuflow": [], "rsync": []}
        wire: dict[str, list[int]] = {"gpuflow": [], "rsync": []}
        mtime = (source / "model.weights").stat().st_mtime_ns
        middle = size // 2 + 12_345
        turn = 0
        for attempt in range(arguments.repeat):
            order = ("gpuflow", "rsync") if attempt % 2 == 0 else ("rsync", "gpuflow")
            for name in order:
                turn += 1
                with (source / "model.weights").open("r+b") as handle:
                    handle.seek(middle)
                    handle.write(os.urandom(MB))
                mtime += 1_000_000_000
                os.utime(source / "model.weights", ns=(mtime, mtime))
                started = time.perf_counter()
                if name == "gpuflow":
                    report = sync_directory(source, destination)
                    elapsed = time.perf_counter() - started
                    assert report.method == "delta", report.method
                    wire[name].append(outcomes[-1].wire_bytes)
                else:
                    wire[name].append(rsync(target, source, theirs_dir))
                    elapsed = time.perf_counter() - started
                times[name].append(elapsed)
                copy = (ours_dir if name == "gpuflow" else theirs_dir) / "model.weights"
                status = copy.stat()
                assert (status.st_size, status.st_mtime_ns // 1_000_000_000) == (size, mtime // 1_000_000_000)
                with copy.open("rb") as theirs_handle, (source / "model.weights").open("rb") as ours_handle:
                    theirs_handle.seek(middle - 4096)
                    ours_handle.seek(middle - 4096)
                    assert theirs_handle.read(MB + 8192) == ours_handle.read(MB + 8192), f"{copy} differs"
                print(f"  round {attempt + 1} {name:8} {elapsed:6.3f} s", flush=True)
        sync_directory(source, destination)  # the contender that went first is one change behind
        rsync(target, source, theirs_dir)
        for copy in (ours_dir, theirs_dir):
            assert digest(source / "model.weights") == digest(copy / "model.weights"), f"{copy} differs"

        cold = times["gpuflow"].pop(0)
        wire["gpuflow"].pop(0)
        ours, theirs = times["gpuflow"], times["rsync"]
        print(f"\n1 MB changed inside a {arguments.size_mb} MB file, {arguments.repeat} rounds, destinations on "
              f"{where or 'disk'}; load average {os.getloadavg()[0]:.1f}")
        print(f"  gpuflow cold (first round: the blocks hashed there too) {cold:.3f} s")
        for name, values in (("gpuflow", ours), ("rsync", theirs)):
            print(f"  {name:8} median {statistics.median(values):.3f} s (range {min(values):.3f}–{max(values):.3f}), "
                  f"on the wire {statistics.median(wire[name]) / 1e6:.2f} MB")
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"  ratio gpuflow / rsync -az: {ratio:.2f}x (cold {cold / statistics.median(theirs):.2f}x); "
              "target <= 1.00x")
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
