"""The durable sidecar's parts, in process: SigV4 equal to botocore's signer, COMMIT.json written
last, the reader restoring only committed checkpoints whose files match, the prune order, and the
layout constants equal to gpuflow.durable's contract."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

import gpuflow.durable as contract
from gpuflow.durable import uploader
from tests.durable.durable_helpers import BUCKET, REGION, bucket, moto_s3, read, sha256  # noqa: F401 - fixtures

NOW = datetime.datetime(2026, 11, 30, 12, 34, 56, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize("method, path, query, body, token", [
    ("PUT", "/bucket/runs/gf-1/run 1/checkpoints/000001/state.json", {}, b'{"step": 5}', "session"),
    ("GET", "/bucket", {"list-type": "2", "prefix": "runs/gf-1/r/checkpoints/", "continuation-token": "a+b/c="}, b"",
     None),
    ("DELETE", "/bucket/runs/gf-1/r/log/job.log", {}, b"", "tok"),
])
def test_sigv4_signature_equals_botocores(method, path, query, body, token, monkeypatch):
    payload = hashlib.sha256(body).hexdigest()
    headers = {"x-amz-checksum-sha256": "abc="} if method == "PUT" else {}
    ours = uploader.sign_v4(method, "s3.us-east-1.amazonaws.com", path, query, headers, payload, "AKIDEXAMPLE",
                            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token, "us-east-1", NOW)
    url = "https://s3.us-east-1.amazonaws.com" + uploader._quote(path, safe="-_.~/")
    request = AWSRequest(method=method, url=url, data=body, params=query,
                         headers={"x-amz-checksum-sha256": "abc="} if method == "PUT" else {})
    request.context["payload_signing_enabled"] = True
    request.headers["X-Amz-Content-SHA256"] = payload
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: NOW.replace(tzinfo=None))
    S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token), "s3",
                "us-east-1").add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]


def test_the_layout_is_the_contracts():
    for name in ("CHECKPOINTS", "COMMIT_NAME", "LOG_KEY", "OUTPUTS", "MANIFEST_KEY", "SEQ_DIGITS"):
        assert getattr(uploader, name) == getattr(contract, name)
    from gpuflow.durable import status

    assert status.DURABLE_FILE == uploader.DURABLE_FILE
    assert contract.checkpoint_prefix("o", "r", 7) == "runs/o/r/checkpoints/" + uploader.seq_name(7) + "/"


class RecordingS3:
    """An in-memory S3 that records each call in order."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.bucket = "b"
        self.fail_on = fail_on

    def put(self, key, data):
        self.calls.append(("PUT", key))
        if self.fail_on and key.endswith(self.fail_on):
            raise uploader.S3Error("refused")
        self.objects[key] = data

    def get(self, key):
        return self.objects.get(key)

    def delete(self, key):
        self.calls.append(("DELETE", key))
        self.objects.pop(key, None)

    def list(self, prefix):
        return sorted(key for key in self.objects if key.startswith(prefix))


def _checkpoint(run_dir: Path, step: int) -> None:
    directory = run_dir / "outputs" / "checkpoint"
    directory.mkdir(parents=True, exist_ok=True)
    variables = bytes([step]) * 1000
    (directory / "variables.npz").write_bytes(variables)
    (directory / "state.json").write_text(json.dumps({"format": 1, "complete": True, "epoch": 2, "step": step,
                                                      "variables_sha256": sha256(variables)}))


def _uploader(run_dir: Path, s3) -> uploader.Uploader:
    return uploader.Uploader(str(run_dir), s3, "runs/o/r/", log_seconds=30, final_seconds=1)


def test_commit_json_goes_last_and_only_the_two_newest_stay(tmp_path):
    s3 = RecordingS3()
    up = _uploader(tmp_path, s3)
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step)
        up.look()
        up.commit_pending()
    puts = [key for verb, key in s3.calls if verb == "PUT" and "/000001/" in key]
    assert puts[-1].endswith("/000001/COMMIT.json") and len(puts) == 3
    assert uploader.committed_seqs(s3.list("runs/o/r/"), "runs/o/r/") == [3, 2]
    assert not any("/000001/" in key for key in s3.objects)
    deletes = [key for verb, key in s3.calls if verb == "DELETE"]
    assert deletes[0].endswith("/000001/COMMIT.json")  # the marker goes first: never a half-deleted "committed" one
    commit = json.loads(s3.objects["runs/o/r/checkpoints/000003/COMMIT.json"])
    assert (commit["seq"], commit["epoch"], commit["step"]) == (3, 2, 3)
    # the same checkpoint seen again is not committed again
    up.look()
    assert up.pending is None


def test_a_failed_commit_marker_leaves_the_checkpoint_uncommitted_and_named(tmp_path):
    s3 = RecordingS3(fail_on="COMMIT.json")
    up = _uploader(tmp_path, s3)
    _checkpoint(tmp_path, 4)
    assert up.final("75") == 1
    assert uploader.committed_seqs(s3.list("runs/o/r/"), "runs/o/r/") == []
    status = json.loads((tmp_path / "durable.json").read_text())
    assert status["state"] == "failed" and status["lost"]["step"] == 4 and "refused" in status["lost"]["reason"]
    assert "gpuflow-durable: LOST: the checkpoint at epoch 2 step 4 was never uploaded" in (tmp_path / "job.log").read_text()


def test_a_checkpoint_mid_rename_is_not_taken(tmp_path):
    _checkpoint(tmp_path, 1)
    (tmp_path / "outputs" / "checkpoint" / "variables.npz").write_bytes(b"half written")
    assert uploader.read_checkpoint(str(tmp_path / "outputs" / "checkpoint")) is None


class Static:
    def get(self):
        return ("test", "test", None)


@pytest.fixture
def s3(bucket, moto_s3):
    return uploader.S3(moto_s3, REGION, BUCKET, Static())


def _commit(s3, seq: int, step: int, *, committed: bool = True, damage: bool = False) -> None:
    files = {"state.json": json.dumps({"format": 1, "complete": True, "epoch": 1, "step": step}).encode(),
             "variables.npz": bytes([seq]) * 100}
    base = f"runs/o/r/checkpoints/{uploader.seq_name(seq)}/"
    for name, data in files.items():
        s3.put(base + name, data)
    if committed:
        s3.put(base + "COMMIT.json", json.dumps(uploader.commit_document(files, seq=seq, epoch=1, step=step)).encode())
    if damage:
        s3.put(base + "variables.npz", b"tampered")


def test_restore_takes_the_newest_committed_checkpoint_and_ignores_an_uncommitted_one(s3, tmp_path):
    _commit(s3, 1, 5)
    _commit(s3, 2, 10)
    _commit(s3, 3, 15, committed=False)  # written, never committed (the instance went mid-upload)
    outcome = uploader.restore(str(tmp_path), s3, "runs/o/r/")
    assert (outcome["restore"], outcome["seq"], outcome["step"]) == ("restored", 2, 10)
    state = json.loads((tmp_path / "outputs" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10 and (tmp_path / "outputs" / "checkpoint" / "variables.npz").read_bytes() == b"\x02" * 100
    assert not list((tmp_path / "outputs").glob(".checkpoint.tmp-*"))
    # a node that has a complete checkpoint keeps it
    assert uploader.restore(str(tmp_path), s3, "runs/o/r/")["restore"] == "not needed"


def test_restore_refuses_a_file_that_does_not_match_its_sha256(s3, tmp_path):
    _commit(s3, 1, 5)
    _commit(s3, 2, 10, damage=True)
    outcome = uploader.restore(str(tmp_path), s3, "runs/o/r/")
    assert (outcome["restore"], outcome["step"]) == ("restored", 5)
    log = (tmp_path / "job.log").read_text()
    assert "refused checkpoint 000002" in log and "variables.npz does not match its sha256" in log


def test_restore_with_nothing_committed_starts_over(s3, tmp_path):
    _commit(s3, 1, 5, damage=True)
    assert uploader.restore(str(tmp_path), s3, "runs/o/r/")["restore"] == "refused"
    assert not (tmp_path / "outputs" / "checkpoint").exists()
    assert "the job starts from the beginning" in (tmp_path / "job.log").read_text()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "a\\b"])
def test_a_commit_naming_an_unsafe_path_is_refused(name):
    document = {"format": 1, "files": {name: {"size": 1, "sha256": "0" * 64}}}
    with pytest.raises(ValueError, match="unsafe|incomplete"):
        uploader.checked_commit(json.dumps(document).encode())


def test_plain_http_only_to_loopback():
    with pytest.raises(ValueError, match="loopback"):
        uploader.S3("http://s3.example.com", REGION, BUCKET, Static())
    uploader.S3("https://s3.us-east-1.amazonaws.com", REGION, BUCKET, Static())


def test_role_credentials_come_from_imdsv2_and_are_renewed_before_they_expire(monkeypatch):
    import http.server

    from tests.durable.durable_helpers import serving

    served = []

    class Imds(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: bytes, status: int = 200):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self):  # noqa: N802
            self._answer(b"token")

        def do_GET(self):  # noqa: N802
            if self.headers.get("X-aws-ec2-metadata-token") != "token":
                return self._answer(b"", 401)
            if self.path.endswith("/security-credentials/"):
                return self._answer(b"role")
            served.append(self.path)
            expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=len(served) * 60 - 58)
            self._answer(json.dumps({"AccessKeyId": f"ASIA{len(served)}", "SecretAccessKey": "s", "Token": "t",
                                     "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode())

    with serving(Imds) as endpoint:
        credentials = uploader.RoleCredentials(endpoint)
        first = credentials.get()  # expires in 2 minutes: inside the 5-minute margin, renewed at once
        second = credentials.get()
        third = credentials.get()  # expires in an hour: kept
    assert (first[0], second[0], third[0]) == ("ASIA1", "ASIA2", "ASIA2")
    assert served == ["/latest/meta-data/iam/security-credentials/role"] * 2


def test_no_role_is_a_clear_error():
    with pytest.raises(uploader.S3Error, match="no instance role credentials"):
        uploader.RoleCredentials("http://127.0.0.1:9").get()


def test_a_succeeded_job_loses_no_checkpoint_it_did_not_upload(tmp_path):
    s3 = RecordingS3(fail_on="COMMIT.json")  # every commit marker is refused: outputs' too
    up = _uploader(tmp_path, s3)
    _checkpoint(tmp_path, 4)
    up.look()
    assert up.final("0") == 1
    status = json.loads((tmp_path / "durable.json").read_text())
    assert status["lost"] is None and "refused" in status["outputs"]["failed"]
    log = (tmp_path / "job.log").read_text()
    assert "LOST: the outputs were not uploaded" in log and "LOST: the checkpoint" not in log
