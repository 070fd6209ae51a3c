#!/usr/bin/env python3
"""Recovery, measured: from a sandbox instance gone to its run's training resumed on the next one.

As a user would (README "Recovery"): ``gpuflow setup --sandbox``, then per round ``gpuflow run
--up --sandbox --spot --recover --down`` of ``training.cifar10_cnn`` (digits, small), and, once
the first node's sidecar committed a step checkpoint, ``gpuflow sandbox interrupt --notice-seconds
N``.  Timestamps (this machine's clock, one clock for all):

* gpuflow's own remarks on stderr, each stamped as its line arrives (``relaunching …``,
  ``relaunched in …``, ``syncing …``, ``reusing/preparing the environment …``, ``run R started``);
* the nodes' sandbox directories, polled every 20 ms: the interrupted node's directory gone (the
  instance's processes killed and its disk deleted: "instance gone"), and on the new node the
  mtimes of ``supervisor.pid`` (the supervisor is up; the restore from S3 starts),
  ``durable.json`` as first written (the restore's outcome), ``job.proc`` (the job's process
  starts), and the first sight of ``training: resuming from …`` in its ``job.log`` (the module
  restored the checkpoint and fit() begins: the first resumed step follows);
* the interruption request (``requested_at``: the notice is served from then on).

Phases (each from the end of the one before): detection (instance gone → gpuflow says
``relaunching``), relaunch (→ ``relaunched``: old one terminated, new one launched and running),
sync (→ its last ``sent … files`` remark: project + data), environment and supervisor start (→ ``run R
started``: environment, supervisor written and launched, the restore from S3 and the job's pid
included), restore (supervisor.pid → durable.json), job start → resumed training
(job.proc → ``training: resuming``; mostly TensorFlow's import, measured on its own too).
"gpuflow's part" is instance gone → job started (job.proc): everything before the module's own start.
Run inside a loopback-only network namespace:

    unshare -n sh -c 'ip link set lo up && PYTHONPATH=$PWD python3 bench/recovery_time.py'

ROUNDS (3), NOTICE (2) and EPOCHS (3) in the environment change the defaults.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
NOTICE = os.environ.get("NOTICE", "2")
ARGS = ["--dataset", "digits", "--limit", "600", "--epochs", os.environ.get("EPOCHS", "3"), "--batch-size", "16",
        "--seed", "0", "--save-every-steps", "8"]


class Stamped:
    """Lines of a stream, each with the time it arrived."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first(self, needle: str, after: float = 0.0) -> float | None:
        return next((t for t, line in self.lines if t >= after and needle in line), None)


class NodeWatch:
    """Polls the sandbox nodes' directories (20 ms) for the moments the bench needs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: dict[str, dict[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            present = {p.name: p for p in self.root.glob("i-*") if p.is_dir()} if self.root.is_dir() else {}
            for name, path in present.items():
                marks = self.seen.setdefault(name, {"dir": now})
                for run in path.glob("runs/*"):
                    for mark in ("supervisor.pid", "durable.json", "job.proc"):
                        if mark not in marks:
                            try:
                                marks[mark] = (run / mark).stat().st_mtime
                            except OSError:
                                pass
                    if "committed" not in marks:
                        try:
                            if json.loads((run / "durable.json").read_text()).get("committed"):
                                marks["committed"] = now
                        except (OSError, ValueError):
                            pass
                    if "resuming" not in marks:
                        try:
                            if "training: resuming from" in (run / "job.log").read_text(errors="replace"):
                                marks["resuming"] = now
                        except OSError:
                            pass
            for name, marks in self.seen.items():
                if name not in present and "gone" not in marks:
                    marks["gone"] = now
            self.stop.wait(0.02)


def tf_import_seconds(env: dict) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, check=True, capture_output=True)
    return time.time() - started


def one_round(home: Path, project: Path, env: dict) -> dict[str, float]:
    gpuflow = [sys.executable, "-m", "gpuflow"]
    watch = NodeWatch(home / "sandbox" / "sbox")
    run = subprocess.Popen([*gpuflow, "run", "--up", "--sandbox", "--spot", "--recover", "--down", "sbox",
                            "training.cifar10_cnn", "--", *ARGS], cwd=project, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    err = Stamped(run.stderr)
    try:
        deadline = time.time() + 600
        while not any("committed" in marks for marks in watch.seen.values()):
            if time.time() > deadline or run.poll() is not None:
                raise SystemExit("no committed checkpoint on the first node")
            time.sleep(0.05)
        [first] = list(watch.seen)
        subprocess.run([*gpuflow, "sandbox", "interrupt", "sbox", "--notice-seconds", NOTICE], cwd=project, env=env,
                       check=True, capture_output=True)
        run.wait(timeout=900)
        err.thread.join(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        watch.stop.set()
        watch.thread.join()
    if run.returncode != 0:
        raise SystemExit("the run failed:\n" + "\n".join(line for _, line in err.lines[-20:]))
    if os.environ.get("SHOW"):
        base = err.lines[0][0] if err.lines else 0.0
        for t, line in err.lines:
            print(f"  {t - base:8.2f}  {line}")
        for name, marks in watch.seen.items():
            print(f"  {name}: " + ", ".join(f"{k} {v - base:.2f}" for k, v in sorted(marks.items(), key=lambda i: i[1])))
    second = next(name for name in watch.seen if name != first)
    old, new = watch.seen[first], watch.seen[second]
    gone = old["gone"]
    relaunching = err.first("relaunching a")
    relaunched = err.first("relaunched in", relaunching)
    started = err.first("started on", relaunched)
    synced = max(t for t, line in err.lines if relaunched <= t <= started and " files (" in line)
    return {
        "detection": relaunching - gone,
        "relaunch": relaunched - relaunching,
        "sync": synced - relaunched,
        "environment and supervisor start": started - synced,
        "restore (inside the one before)": new["durable.json"] - new["supervisor.pid"],
        "job start to resumed training": new["resuming"] - new["job.proc"],
        "gpuflow's part (instance gone to job started)": new["job.proc"] - gone,
        "total (instance gone to resumed training)": new["resuming"] - gone,
    }


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="gpuflow-recovery-bench-"))
    project = home / "project"
    project.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPUFLOW_HOME": str(home)}
    gpuflow = [sys.executable, "-m", "gpuflow"]
    load_before = os.getloadavg()
    subprocess.run([*gpuflow, "setup", "--sandbox"], cwd=project, env=env, check=True, capture_output=True)
    rounds = []
    try:
        for number in range(ROUNDS):
            figures = one_round(home, project, env)
            # TensorFlow's import on its own (a fresh process, the same load): the bulk of "job start to
            # resumed training", which is the training module's, not gpuflow's.
            figures["TF import alone"] = tf_import_seconds(env)
            rounds.append(figures)
            print(f"round {number + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in figures.items()), flush=True)
    finally:
        subprocess.run([*gpuflow, "setup", "--delete", "--sandbox", "--force"], cwd=project, env=env,
                       capture_output=True)
    print(f"\n{len(rounds)} rounds, load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs); seconds, median [min–max]:")
    for phase in rounds[0]:
        values = [r[phase] for r in rounds]
        print(f"  {phase:45s} {statistics.median(values):6.2f}  [{min(values):.2f}–{max(values):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
