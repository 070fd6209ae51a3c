"""Benchmark: pulling a run's files (`gpuflow pull`'s transfer) against `rsync -a`, over the same loopback sshd.

Starts a throwaway OpenSSH server on 127.0.0.1 (bench/_sshd.py), builds two
remote run directories, and pulls each into a fresh tmpfs directory
(/dev/shm: a disk destination varies 2-5x from run to run for both tools),
the contenders taking turns ``--repeat`` times:

1. one 200 MB checkpoint (random bytes);
2. 2,000 files of 10 KB in 20 directories.

gpuflow is timed in-process as a pull does it: connect (paramiko, pinned
host key), then one remote process lists the run directory and streams the
files, which are verified and placed here (``pull_files``).  ``--breakdown``
also times each phase, and a bare ``tar cf -`` of the same files over a
paramiko channel and over OpenSSH (what the transport alone costs).  rsync runs as the
subprocess a user would, ``rsync -a`` with the same pinned-key ssh options.
``--compare`` adds gpuflow with paramiko's default cipher order (AES-CTR + HMAC) and without
the first pull's push, and with GCM but no push, to the rotation.  Prints the median and
range of each, and the ratio of medians; targets (issue 16): 1.1x and 1.2x.  Run it in a loopback-only namespace:

    unshare -n sh -c 'ip link set lo up && python bench/pull_bench.py'
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

from bench._sshd import pinned_target, start_sshd  # noqa: E402
from gpuflow.jobs.pulling import pull_files  # noqa: E402
from gpuflow.records import SSHTarget  # noqa: E402
from gpuflow.transport.openssh import ssh_argv  # noqa: E402
from gpuflow.transport.ssh import SSHRunner  # noqa: E402


def build(remote: Path, *, big_mb: int, small_files: int, small_kb: int) -> None:
    (remote / "big" / "outputs").mkdir(parents=True)
    with open(remote / "big" / "outputs" / "model.keras", "wb") as handle:
        for _ in range(big_mb):
            handle.write(os.urandom(1 << 20))
    for index in range(small_files):
        path = remote / "small" / "outputs" / f"d{index % 20:02d}" / f"f{index:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(small_kb << 10))


def gpuflow_pull(target: SSHTarget, remote_dir: Path, destination: Path) -> int:
    with SSHRunner(target, base_dir=str(remote_dir.parent / "gpuflow-base"), touch_heartbeat=False) as runner:
        report = pull_files(runner, str(remote_dir), destination)  # listing, hashes and files in one remote process
    assert not report.changing and not report.refused
    return len(report.fetched)


def without(*, gcm: bool, push: bool):
    """gpuflow's pull with AES-GCM and/or the first pull's push turned off (``--compare``:
    what each contributes, in the same rotation)."""
    import paramiko

    from gpuflow.jobs import pulling
    from gpuflow.transport import ssh

    def pull(target: SSHTarget, remote_dir: Path, destination: Path) -> int:
        saved = ssh._new_transport, pulling._holds_nothing
        if not gcm:
            ssh._new_transport = paramiko.Transport  # paramiko's own order: aes128-ctr first
        if not push:
            pulling._holds_nothing = lambda local_dir: False
        try:
            return gpuflow_pull(target, remote_dir, destination)
        finally:
            ssh._new_transport, pulling._holds_nothing = saved

    return pull


def breakdown(target: SSHTarget, remote_dir: Path, destination: Path) -> dict[str, float]:
    """Where a gpuflow pull's time goes: the connection, the session's first answer (the
    remote Python's start and the listing), the stream with its checks and placement; and,
    for the same bytes, a bare `tar cf -` read over a paramiko channel and over OpenSSH."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with SSHRunner(target, base_dir=str(remote_dir.parent / "gpuflow-base"), touch_heartbeat=False) as runner:
        runner.connect()
        timings["connect"] = time.perf_counter() - started
        started = time.perf_counter()
        with runner.pull_session(str(remote_dir), ("outputs",), push=True) as stream:  # as a first pull does
            timings["listing"] = time.perf_counter() - started
            started = time.perf_counter()
            report = pull_files(runner, str(remote_dir), destination, entries=stream.listing, stream=stream)
        timings["stream"] = time.perf_counter() - started
        assert report.fetched and not report.changing
        started = time.perf_counter()
        channel = runner._client.get_transport().open_session()  # the bare transport, for comparison
        channel.exec_command(f"tar cf - -C {shlex.quote(str(remote_dir))} outputs")
        while channel.recv(1 << 20):
            pass
        timings["paramiko tar"] = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(
        [*ssh_argv(target), target.host, f"tar cf - -C {shlex.quote(str(remote_dir))} outputs"],
        stdout=subprocess.DEVNULL, check=True,
    )
    timings["openssh tar"] = time.perf_counter() - started
    return timings


def rsync_pull(target: SSHTarget, remote_dir: Path, destination: Path) -> int:
    destination.mkdir(parents=True)
    subprocess.run(
        ["rsync", "-a", "-e", shlex.join(ssh_argv(target)), f"{target.host}:{remote_dir}/outputs", f"{destination}/"],
        check=True,
    )
    return sum(len(files) for _, _, files in os.walk(destination))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--small-kb", type=int, default=10)
    parser.add_argument("--breakdown", action="store_true", help="also time each phase of gpuflow's pull")
    parser.add_argument("--compare", action="store_true",
                        help="also time gpuflow without AES-GCM and without the first pull's push, in the same rotation")
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpuflow-pull-bench-", dir="/dev/shm"))
    server = start_sshd(work)
    try:
        target = pinned_target(server, work)
        remote = work / "remote"
        build(remote, big_mb=arguments.big_mb, small_files=arguments.small_files, small_kb=arguments.small_kb)
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        cases = [
            (f"pull one {arguments.big_mb} MB file", remote / "big", 1.1),
            (f"pull {arguments.small_files:,} files of {arguments.small_kb} KB", remote / "small", 1.2),
        ]
        for title, remote_dir, goal in cases:
            order = [("gpuflow", gpuflow_pull), ("rsync -a", rsync_pull)]
            if arguments.compare:
                order[1:1] = [("no GCM, no push", without(gcm=False, push=False)), ("GCM, no push", without(gcm=True, push=False))]
            timings: dict[str, list[float]] = {name: [] for name, _pull in order}
            for attempt in range(arguments.repeat):
                shift = attempt % len(order)
                for index, (name, pull) in enumerate(order[shift:] + order[:shift]):  # rotate who goes first
                    destination = work / "local" / f"{index}-{attempt}"
                    started = time.perf_counter()
                    count = pull(target, remote_dir, destination)
                    timings[name].append(time.perf_counter() - started)
                    shutil.rmtree(destination)
                    assert count >= 1
            if arguments.breakdown:
                phases: dict[str, list[float]] = {}
                for attempt in range(arguments.repeat):
                    destination = work / "local" / f"breakdown-{attempt}"
                    for phase, seconds in breakdown(target, remote_dir, destination).items():
                        phases.setdefault(phase, []).append(seconds)
                    shutil.rmtree(destination)
                print(f"{title}, gpuflow's phases (median, range): " + ", ".join(
                    f"{phase} {statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"
                    for phase, values in phases.items()
                ))
            medians = {name: statistics.median(values) for name, values in timings.items()}
            ratio = medians["gpuflow"] / medians["rsync -a"]
            print(f"{title}: ratio {ratio:.2f}x (goal <= {goal}x)")
            for name, values in timings.items():
                print(f"  {name:15s} median {medians[name]:.3f} s  range {min(values):.3f}-{max(values):.3f} s  "
                      f"{medians[name] / medians['rsync -a']:.2f}x")
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
