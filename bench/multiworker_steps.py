"""Steps/s of a module trained by 1 and by 2 MultiWorkerMirroredStrategy workers on this
machine (worker processes on 127.0.0.1, one thread each), and the all-reduce overhead.

    python bench/multiworker_steps.py [--module training.mnist_mlp] [--epochs 4] [--batch-size 128]

Three runs, each with TF_CONFIG: one worker at the global batch B, one worker at B/2 (what
each of two workers computes), two workers at B.  Steady state = the epochs after the
first (train_seconds in history.csv, validation excluded).  The all-reduce overhead per
step is the two-worker step time minus the one-worker step time at B/2.  Run it only in a
loopback-only network namespace (unshare -n).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def run(module: str, workers: int, batch: int, epochs: int, root: Path) -> float:
    """Seconds per step in the steady state (the chief's history.csv)."""
    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    output = root / f"{workers}w-b{batch}"
    processes = []
    for index in range(workers):
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(root / "keras"), "TMPDIR": str(root),
               "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", module, "--dataset", "digits", "--epochs", str(epochs), "--batch-size", str(batch),
             "--optimizer", "adam", "--output", str(output / f"w{index}")],
            cwd=REPOSITORY, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"{module} with {workers} worker(s) failed")
    with (output / "w0" / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    metrics = json.loads((output / "w0" / "metrics.json").read_text())
    steps = -(-int(metrics["samples"]["train"]) // batch)
    seconds = [float(row["train_seconds"]) for row in rows[1:]]
    return sum(seconds) / (len(seconds) * steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--module", default="training.mnist_mlp")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        one = run(args.module, 1, args.batch_size, args.epochs, root)
        half = run(args.module, 1, args.batch_size // 2, args.epochs, root)
        two = run(args.module, 2, args.batch_size, args.epochs, root)
    print(f"{args.module}, global batch {args.batch_size}, one thread per worker:")
    print(f"  1 worker : {1 / one:7.1f} steps/s ({one * 1000:.1f} ms/step)")
    print(f"  2 workers: {1 / two:7.1f} steps/s ({two * 1000:.1f} ms/step), speed-up {one / two:.2f}x")
    print(f"  1 worker at batch {args.batch_size // 2}: {half * 1000:.1f} ms/step -> all-reduce overhead "
          f"~{(two - half) * 1000:.1f} ms/step")
    try:
        print(f"  load average: {os.getloadavg()[0]:.1f}")
    except OSError:
        pass


if __name__ == "__main__":
    main()
