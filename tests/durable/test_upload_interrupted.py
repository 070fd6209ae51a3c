"""An instance that goes while its sidecar is between the objects of a checkpoint upload: the
real sidecar process (``watch``, against moto's S3 through the instance role's credentials),
held after its first object by the test-only pause, is SIGKILLed as the instance's end kills
it. The half-sent checkpoint has no COMMIT.json; the reader restores the previous committed one,
and the next attempt numbers its checkpoints after the half-sent one (never reusing its keys)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from gpuflow.durable import uploader
from gpuflow.durable.status import DurableStatus, Position
from tests.durable.durable_helpers import BUCKET, REGION, bucket, durable, keys, moto_s3, sha256  # noqa: F401 - fixtures
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
PREFIX = "runs/o/r/"
SIDECAR = "import sys; from gpuflow.durable.uploader import durable_main; sys.exit(durable_main(sys.argv[1:]))"


def _checkpoint(run_dir: Path, step: int) -> dict[str, bytes]:
    directory = run_dir / "outputs" / "checkpoint"
    directory.mkdir(parents=True, exist_ok=True)
    variables = bytes([step]) * 1000
    state = json.dumps({"format": 1, "complete": True, "epoch": 1, "step": step,
                        "variables_sha256": sha256(variables)}).encode()
    (directory / "variables.npz").write_bytes(variables)
    (directory / "state.json").write_bytes(state)
    return {"state.json": state, "variables.npz": variables}


def test_an_upload_killed_between_its_objects_is_never_restored(durable, tmp_path):
    client = durable
    # attempt 1 committed checkpoint 000001 (step 5)
    files = _checkpoint(tmp_path / "before", 5)
    for name, data in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}checkpoints/000001/{name}", Body=data)
    commit = uploader.commit_document(files, seq=1, epoch=1, step=5, attempt=1)
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}checkpoints/000001/COMMIT.json", Body=json.dumps(commit).encode())

    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 10)
    env = {**os.environ, "PYTHONPATH": str(REPO), uploader.TEST_UPLOAD_DELAY_VARIABLE: "120"}
    sidecar = subprocess.Popen([sys.executable, "-c", SIDECAR, "watch", str(run_dir), f"s3://{BUCKET}/{PREFIX}",
                                REGION], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def in_flight() -> DurableStatus | None:  # once the first object of the checkpoint went up
            try:
                raw = (run_dir / "durable.json").read_text()
            except OSError:
                return None
            status = DurableStatus.parse(raw)
            sent = ((json.loads(raw) if status is not None else {}).get("uploading") or {}).get("sent")
            return status if sent else None

        status = wait_for(in_flight, timeout=30, what="the sidecar between the objects of checkpoint 000002")
        document = json.loads((run_dir / "durable.json").read_text())
        assert document["uploading"]["seq"] == 2 and document["uploading"]["sent"] == ["state.json"]
        assert status.uploading == Position(1, 10) and status.committed is None
    finally:
        sidecar.send_signal(signal.SIGKILL)  # the instance's end
        sidecar.wait(timeout=30)

    held = keys(client, f"{PREFIX}checkpoints/000002/")
    assert held == [f"{PREFIX}checkpoints/000002/state.json"]  # sent, but never committed
    assert uploader.committed_seqs(keys(client, PREFIX), PREFIX) == [1]

    s3 = uploader.S3(os.environ[uploader.S3_ENDPOINT_VARIABLE], REGION, BUCKET, uploader.RoleCredentials(
        os.environ["GPUFLOW_IMDS_ENDPOINT"]))
    fresh = tmp_path / "next-node"
    outcome = uploader.restore(str(fresh), s3, PREFIX)
    assert (outcome["restore"], outcome["seq"], outcome["step"]) == ("restored", 1, 5)
    assert (fresh / "outputs" / "checkpoint" / "variables.npz").read_bytes() == files["variables.npz"]

    # the next attempt's first checkpoint is 000003: the half-sent keys of 000002 are never overwritten
    nxt = uploader.Uploader(str(fresh), s3, PREFIX, log_seconds=30, final_seconds=1)
    _checkpoint(fresh, 12)
    nxt.look()
    nxt.commit_pending()
    assert uploader.committed_seqs(keys(client, PREFIX), PREFIX) == [3, 1]
    assert json.loads((fresh / "durable.json").read_text())["uploading"] is None


class _S3:
    def __init__(self, endpoint: str) -> None:
        self.scheme, _, rest = endpoint.partition("://")
        self.hostname = rest.split(":")[0]


def test_the_test_pause_is_inert_unless_set_for_a_loopback_endpoint_and_its_attempt():
    name, attempt_name = uploader.TEST_UPLOAD_DELAY_VARIABLE, uploader.TEST_UPLOAD_DELAY_ATTEMPT_VARIABLE
    sandbox, aws = _S3("http://127.0.0.1:5000"), _S3("https://s3.us-east-1.amazonaws.com")
    assert uploader.upload_delay_for_tests({}, sandbox, 1) == 0
    assert uploader.upload_delay_for_tests({name: "7"}, sandbox, 1) == 7
    assert uploader.upload_delay_for_tests({name: "7"}, aws, 1) == 0  # never against real S3
    assert uploader.upload_delay_for_tests({name: "7", attempt_name: "2"}, sandbox, 1) == 0
    assert uploader.upload_delay_for_tests({name: "7", attempt_name: "2"}, sandbox, 2) == 7


def test_the_attempt_is_the_one_the_node_was_started_for_plus_its_restarts_in_place(tmp_path):
    assert uploader.attempt_number(str(tmp_path)) == 1  # the run's first node
    (tmp_path / uploader.ATTEMPT_FILE).write_text(json.dumps({"attempt": 3}))  # `run --recover` relaunched it here
    assert uploader.attempt_number(str(tmp_path)) == 3
    (tmp_path / "attempts" / "3").mkdir(parents=True)  # then restarted once in place on this node
    assert uploader.attempt_number(str(tmp_path)) == 4
    (tmp_path / uploader.ATTEMPT_FILE).write_text('{"attempt": "x"}')
    assert uploader.attempt_number(str(tmp_path)) == 2
