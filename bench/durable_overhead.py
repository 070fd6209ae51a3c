#!/usr/bin/env python3
"""Durable runs, measured: bytes uploaded per checkpoint and the S3 uploads' overhead on a run's duration.

Runs ``training.cifar10_cnn --dataset digits`` in a sandbox-style node (a LocalRunner directory)
twice per round — without a durable store, then with one (moto's S3 on loopback, an IMDSv2 with
an instance role) — and prints the job durations (from the run's manifest clock: job start to
exit code) and the sidecar's figures from durable.json.  Run inside a loopback-only network
namespace:  unshare -n sh -c 'ip link set lo up && PYTHONPATH=$PWD python3 bench/durable_overhead.py'
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = int(os.environ.get("ROUNDS", "2"))
ARGS = ["--dataset", "digits", "--epochs", os.environ.get("EPOCHS", "6"), "--seed", "0",
        "--save-every-steps", os.environ.get("EVERY", "10")]


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="gpuflow-durable-bench-"))
    os.environ["GPUFLOW_HOME"] = str(home)
    os.environ["GPUFLOW_DURABLE_LOG_SECONDS"] = "30"
    from moto.server import ThreadedMotoServer

    from gpuflow import jobs
    from gpuflow.durable import locate
    from tests.durable.durable_helpers import STORE, RoleImds, node_target, s3_client, serving

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3_client(endpoint).create_bucket(Bucket=STORE.bucket)
    project = home / "project"
    project.mkdir()
    rows = []
    with serving(RoleImds) as imds:
        os.environ["GPUFLOW_IMDS_ENDPOINT"] = imds
        os.environ["GPUFLOW_S3_ENDPOINT"] = endpoint
        for round_number in range(ROUNDS):
            for durable in (False, True):
                locate.store_for = (lambda cluster: STORE) if durable else (lambda cluster: None)
                started = time.monotonic()
                outcome = jobs.run(node_target(home / f"node-{round_number}-{durable}"), project_dir=project,
                                   module="training.cifar10_cnn", args=ARGS, out=io.BytesIO())
                wall = time.monotonic() - started
                run_dir = Path(outcome.record.remote_dir)
                job_seconds = outcome.record.duration_seconds
                row = {"durable": durable, "job_seconds": job_seconds, "wall_seconds": round(wall, 2)}
                if durable:
                    status = json.loads((run_dir / "durable.json").read_text())
                    row.update({key: status[key] for key in ("checkpoint_bytes", "bytes_uploaded", "upload_seconds",
                                                             "final_seconds", "cpu_seconds", "failures", "state")
                                if key in status})
                rows.append(row)
                print(json.dumps(row), flush=True)
    server.stop()
    plain = [row["job_seconds"] for row in rows if not row["durable"]]
    kept = [row["job_seconds"] for row in rows if row["durable"]]
    print(json.dumps({"median_plain": sorted(plain)[len(plain) // 2], "median_durable": sorted(kept)[len(kept) // 2]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
