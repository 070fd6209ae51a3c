"""Exact resume, measured: SIGTERM → checkpoint on disk, checkpoint size, the cost of
``--save-every-steps`` and of ``--deterministic`` on throughput.

Each case runs a training module as a subprocess (CPU, synthetic data, nothing fetched):

* latency: the module trains until its first checkpoint exists (``--save-every-steps``),
  gets SIGTERM, and the time from the signal to the new ``checkpoint/state.json`` (its
  mtime) and to the process's exit (code 75) is taken, with the checkpoint's size;
* throughput: ``images_per_second_after_first_epoch`` from metrics.json, the variants
  taking turns round after round; ratios are medians of per-round ratios.

    python bench/resume_bench.py                   # ~5-10 min on 2 shared cores
    python bench/resume_bench.py --rounds 3 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]

CNN = ["training.cifar10_cnn", "--dataset", "synthetic", "--optimizer", "adam"]
TRANSFER = ["training.transfer_learning", "--dataset", "synthetic", "--base", "mobilenetv2", "--weights", "none",
            "--case", "large-similar", "--image-size", "96"]


def run_module(arguments: list[str], output: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.setdefault("KERAS_HOME", str(output.parent / "keras-home"))
    return subprocess.Popen(
        [sys.executable, "-m", *arguments, "--output", str(output)], cwd=REPOSITORY, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen,
    )


def latency(name: str, arguments: list[str], workdir: Path) -> dict:
    """SIGTERM once the first step checkpoint exists; seconds to the next one and to exit."""
    output = workdir / f"latency-{name}"
    state = output / "checkpoint" / "state.json"
    process = run_module([*arguments, "--epochs", "50", "--save-every-steps", "20"], output)
    deadline = time.monotonic() + 900
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well inside training
    first = json.loads(state.read_text())
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    exited = time.time()
    last = json.loads(state.read_text())
    size = sum(path.stat().st_size for path in (output / "checkpoint").iterdir())
    return {
        "case": name,
        "exit_code": process.returncode,
        "line": err.strip().splitlines()[-1] if err.strip() else "",
        "signal_to_checkpoint_s": round(state.stat().st_mtime - sent, 3),
        "signal_to_exit_s": round(exited - sent, 3),
        "checkpoint_bytes": size,
        "saved_at": [last["epoch"], last["step"]],
        "first_checkpoint": [first["epoch"], first["step"]],
    }


def throughput(variants: dict[str, list[str]], rounds: int, workdir: Path, images: int, epochs: int) -> dict:
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_number in range(rounds):
        order = names[round_number % len(names):] + names[: round_number % len(names)]
        for name in order:
            output = workdir / f"throughput-{name}-{round_number}"
            process = run_module([*CNN, "--limit", str(images), "--epochs", str(epochs), *variants[name]], output)
            _, err = process.communicate(timeout=1800)
            if process.returncode != 0:
                raise SystemExit(f"{name} failed: {err.strip()[-500:]}")
            metrics = json.loads((output / "metrics.json").read_text())
            rates[name].append(metrics["images_per_second_after_first_epoch"])
            print(f"round {round_number + 1} {name}: {rates[name][-1]} img/s", flush=True)
    base = names[0]
    return {
        name: {
            "median_images_per_second": statistics.median(values),
            "median_ratio_to_" + base: round(statistics.median(v / b for v, b in zip(values, rates[base])), 4),
        }
        for name, values in rates.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=3200, help="synthetic training images per throughput run")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per throughput run (the first is not counted)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    arguments = parser.parse_args(argv)
    results: dict = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="resume-bench-") as directory:
        workdir = Path(directory)
        if not arguments.skip_latency:
            results["latency"] = [latency("cnn", CNN, workdir), latency("transfer-mobilenetv2-96px", TRANSFER, workdir)]
            for row in results["latency"]:
                print(json.dumps(row), flush=True)
        results["throughput"] = throughput(
            {
                "plain": [],
                "save-every-100-steps": ["--save-every-steps", "100"],
                "save-every-10-steps": ["--save-every-steps", "10"],
                "deterministic": ["--deterministic"],
            },
            arguments.rounds, workdir, arguments.images, arguments.epochs,
        )
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
