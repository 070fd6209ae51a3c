"""Issue 12's done-when, end to end through the CLI as a user runs it: `gpuflow setup
--sandbox`, then `gpuflow run --up --sandbox --spot --recover --down` of the real course
module, interrupted twice by `gpuflow sandbox interrupt` (each time once the current
node has written a step checkpoint, i.e. mid-epoch while its sidecar uploads it). The run
exits 0, history.csv has each epoch once, the final weights are those of the same module
run uninterrupted as a plain local process, the manifest shows 3 attempts, the bucket
holds the committed outputs, and `gpuflow setup --delete --sandbox --force` leaves nothing.
CI sizes: digits, 600 images, 6 epochs (README "Recovery"); the uninterrupted run is trained
alongside, once per test session (tests/jobs/reference_run.py)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.jobs.reference_run import ORACLE_ARGS, oracle_reference  # noqa: F401 - fixture
from tests.waiting import wait_for

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow is not installed (pip install 'gpuflow[train]')", allow_module_level=True)

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODULE_ARGS = list(ORACLE_ARGS)
TIMING = ("epoch_seconds", "train_seconds")


def _history(outputs: Path) -> list[dict]:
    with (outputs / "history.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def _arrays(outputs: Path) -> dict:
    import h5py
    import numpy as np

    arrays: dict = {}
    with zipfile.ZipFile(outputs / "best_model.keras") as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
            weights.visititems(lambda name, item: arrays.__setitem__(name, np.array(item))
                               if isinstance(item, h5py.Dataset) else None)
    return arrays


def _instances(home: Path) -> list[Path]:
    root = home / "sandbox" / "sbox"
    return sorted(p for p in root.glob("i-*") if p.is_dir()) if root.is_dir() else []


def _checkpoint_on(instance: Path) -> bool:
    return any(instance.glob("runs/*/outputs/checkpoint/state.json"))


def test_setup_run_interrupted_twice_recovers_to_the_uninterrupted_weights(tmp_path, oracle_reference):
    import numpy as np

    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPUFLOW_HOME": str(home)}
    gpuflow = [sys.executable, "-m", "gpuflow"]
    run = None
    try:
        assert subprocess.run([*gpuflow, "setup", "--sandbox"], cwd=project, env=env,
                              capture_output=True).returncode == 0
        run = subprocess.Popen([*gpuflow, "run", "--up", "--sandbox", "--spot", "--recover", "--down", "sbox",
                                "training.cifar10_cnn", "--", *MODULE_ARGS],
                               cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        interrupted: list[Path] = []
        for _ in range(2):
            node = wait_for(lambda: next((i for i in _instances(home) if i not in interrupted and _checkpoint_on(i)),
                                         None), timeout=300, what="a step checkpoint on the current node")
            interrupted.append(node)
            assert subprocess.run([*gpuflow, "sandbox", "interrupt", "sbox", "--notice-seconds", "2"], cwd=project,
                                  env=env, capture_output=True).returncode == 0
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
        reference = oracle_reference.outputs()
        [outputs_dir] = (project / "runs").iterdir()
        outputs = outputs_dir / "outputs"
        history = _history(outputs)
        assert [int(row["epoch"]) for row in history] == list(range(6))  # Keras counts epochs from 0
        assert history == _history(reference)
        mine, theirs = _arrays(outputs), _arrays(reference)
        assert mine.keys() == theirs.keys()
        for name in theirs:
            np.testing.assert_allclose(mine[name], theirs[name], atol=1e-6, rtol=0, err_msg=name)
        manifest = json.loads((outputs_dir / "manifest.json").read_text())
        attempts = manifest["attempts"]
        assert [a["number"] for a in attempts] == [1, 2, 3]
        assert [a["instance_id"] for a in attempts[:2]] == [node.name for node in interrupted]
        assert attempts[-1]["ended"] == "succeeded" and attempts[0]["ended"] != "succeeded" != attempts[1]["ended"]
        import boto3
        from infra.sandbox import read_server_record

        record = read_server_record(home)
        s3 = boto3.client("s3", endpoint_url=record.url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        keys = [o["Key"] for b in s3.list_buckets()["Buckets"]
                for o in s3.list_objects_v2(Bucket=b["Name"]).get("Contents", [])]
        run_id = outputs_dir.name
        assert any(k.endswith(f"/{run_id}/outputs/COMMIT.json") for k in keys), keys
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        deleted = subprocess.run([*gpuflow, "setup", "--delete", "--sandbox", "--force"], cwd=project, env=env,
                                 capture_output=True)
    assert deleted.returncode == 0, deleted.stderr
    from gpuflow.testing.leaks import local_leftovers
    from infra.sandbox import read_server_record

    def server_alive(h: Path) -> int | None:
        record = read_server_record(h)
        if record is None:
            return None
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return None
        return record.pid

    # The stack gone, the server holds nothing: it exits once idle (README "setup"); the
    # test does not wait for that, it stops it, and then nothing of the home is left.
    assert [leftover.kind.value for leftover in local_leftovers(home, server_alive=server_alive)] in (
        [], ["sandbox server"])
    from infra.sandbox import stop_sandbox

    stop_sandbox(home)
    assert local_leftovers(home, server_alive=server_alive) == []
