"""Benchmark: the fixed cost of a command, `gpuflow run` and `gpuflow ssh` against a plain `ssh host true`.

Starts a throwaway OpenSSH server on 127.0.0.1 (tests/sshd.py; its sessions
start in a ``$HOME`` of this bench, so ``~/gpuflow`` lands there), writes a
cluster record pointing at it in a private ``GPUFLOW_HOME`` (as a cloud
instance is reached: host key pinned, the cluster's key), and a one-file
project.  Then, the contenders taking turns ``--repeat`` times (the order
rotating), each as the fresh process a user starts:

1. ``ssh host true`` with gpuflow's OpenSSH options (pinned known_hosts, the key);
2. ``gpuflow run NAME -- python -c "print(1)"`` end to end (sync of an
   unchanged project, start, follow, pull);
3. ``gpuflow ssh NAME -- true``, warm: a shared connection from an earlier command is
   open (started, untimed, when there is none), as when the command is repeated, which is
   how people use it; and cold: no shared connection (closed, untimed, before each), so
   the command makes the connection, and leaves it open for the next (with ``--baseline``,
   the other checkout's ``run`` and both ``ssh`` cases take their turns too);
4. ``python -c pass``: the interpreter's start-up, the floor under any Python entry point.

Every gpuflow command runs as ``sys.executable -m gpuflow`` (the interpreter itself, not
a ``gpuflow`` or pyenv shim on PATH, which adds its own start-up), with its bytecode
compiled once by the warm-up round (as an installed package has it), kept in this
bench's directory.

Counts the SSH connections each gpuflow command makes (``Accepted`` lines of
the server's log, at ``LogLevel INFO``) and prints the median and range of
each and the ratios of medians; targets (issue 16): run <= 3x, ssh <= 1.2x.
Run it in a loopback-only namespace:

    unshare -n sh -c 'ip link set lo up && python3 bench/roundtrip_bench.py'
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from bench._sshd import start_sshd  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another gpuflow checkout (e.g. `git archive main | tar -x -C DIR`) timed in the same "
                        "rotation, for a before/after under the same load")
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpuflow-rt-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    remote_home, home, project = work / "remote-home", work / "home", work / "project"
    for directory in (remote_home, home, project):
        directory.mkdir()
    os.environ["GPUFLOW_HOME"] = str(home)
    os.environ["PYTHONPATH"] = str(REPOSITORY)
    # An installed gpuflow has its bytecode compiled (pip does it); a checkout run with
    # PYTHONDONTWRITEBYTECODE (set in some environments) would compile ~100 modules from
    # source on every start (~0.25 s here).  The contenders keep their bytecode in this
    # bench's directory (written by the warm-up run), never in the checkouts.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    # Sessions start in this bench's remote home ($HOME, and the directory relative paths
    # start from, as on an instance): nothing is written to the real user's home.
    login = work / "login.sh"
    login.write_text(
        '#!/bin/sh\ncd "$HOME" || exit 1\n'
        '[ "$SSH_ORIGINAL_COMMAND" = internal-sftp ] && exec /usr/lib/openssh/sftp-server\n'
        'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    login.chmod(0o755)
    server = start_sshd(work, extra_config=(f"SetEnv HOME={remote_home}", f"ForceCommand {login}"), log_level="INFO")
    try:
        from gpuflow import nodes
        from gpuflow.config import gpuflow_home
        from gpuflow.records import Cluster, Node
        from gpuflow.state import StateStore
        from gpuflow.transport import hostkeys, openssh

        cluster = Cluster(
            name="rt", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
            nodes=(Node("i-0000000000000001", "running", public_ip="127.0.0.1"),),
            key_path=str(server.client_key), ssh_user=server.user, ssh_port=server.port,
        )
        StateStore(gpuflow_home(), "clusters").put(cluster.name, cluster.to_dict())
        hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", server.port,
                               [hostkeys.parse_public_key(server.host_public_key)])
        (project / "job.py").write_text("print(1)\n")
        target = nodes.ssh_target_for(cluster)
        gpuflow = [sys.executable, "-m", "gpuflow"]
        run = ["run", "rt", "--", "python", "-c", "print(1)"]
        ssh = ["ssh", "rt", "--", "true"]
        checkouts = {"": REPOSITORY, **({" (baseline)": arguments.baseline.resolve()} if arguments.baseline else {})}
        contenders: dict[str, tuple[list[str], Path]] = {
            "ssh host true": ([*openssh.ssh_argv(target), target.host, "true"], REPOSITORY),
            # The floor of any Python entry point: the interpreter's own start-up (with site).
            "python -c pass": ([sys.executable, "-c", "pass"], REPOSITORY),
        }
        for suffix, checkout in checkouts.items():
            contenders[f"gpuflow run{suffix}"] = ([*gpuflow, *run], checkout)
            contenders[f"gpuflow ssh warm{suffix}"] = ([*gpuflow, *ssh], checkout)
            contenders[f"gpuflow ssh cold{suffix}"] = ([*gpuflow, *ssh], checkout)

        def prepare(name: str) -> None:
            """Untimed: a shared connection open for the warm case, none for the cold one."""
            if name.startswith("gpuflow ssh cold"):
                openssh.close_masters(str(home))
            elif name.startswith("gpuflow ssh warm") and not openssh.master_sockets(str(home)):
                start(name)

        def start(name: str) -> None:
            argv, checkout = contenders[name]
            subprocess.run(argv, cwd=project, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(checkout)})

        for name in contenders:  # the first sync, warm caches, compiled bytecode
            start(name)
        timings: dict[str, list[float]] = {name: [] for name in contenders}
        connections: dict[str, list[int]] = {name: [] for name in contenders}
        names = list(contenders)
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        for attempt in range(arguments.repeat):
            shift = attempt % len(names)
            for name in names[shift:] + names[:shift]:  # rotate who goes first
                prepare(name)
                before = server.log.read_text().count("Accepted ")
                started = time.perf_counter()
                start(name)
                timings[name].append(time.perf_counter() - started)
                connections[name].append(server.log.read_text().count("Accepted ") - before)
        medians = {name: statistics.median(values) for name, values in timings.items()}
        for name, values in timings.items():
            print(f"  {name:25s} median {medians[name]:.3f} s  range {min(values):.3f}-{max(values):.3f} s  "
                  f"SSH connections {sorted(set(connections[name]))}")
        base = medians["ssh host true"]
        floor = (base + medians["python -c pass"]) / base
        print(f"floor of a Python entry point that execs ssh (ssh + python -c pass): {floor:.2f}x")
        for suffix in checkouts:
            print(f"gpuflow run{suffix} / ssh host true: {medians[f'gpuflow run{suffix}'] / base:.2f}x (goal <= 3x)")
        for name in (name for name in medians if name.startswith("gpuflow ssh")):
            print(f"{name} / ssh host true: {medians[name] / base:.2f}x (goal <= 1.2x)")
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
        assert (remote_home / "gpuflow" / "project" / "job.py").is_file()  # the sync went where the runner works
    finally:
        with contextlib.suppress(Exception):
            from gpuflow.transport import openssh

            openssh.close_masters(str(home))
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
