"""Helpers for the durable-run tests: moto's S3 on loopback (a real server: the sidecar is
another process), an IMDSv2 that serves an instance role's credentials, a bucket built in
moto, and a stand-in job that writes step checkpoints the way training/checkpoint.py does
(a temporary directory renamed into place; no TensorFlow)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from gpuflow.durable import DurableStore, locate
from gpuflow.jobs import RunTarget
from gpuflow.records import Cluster
from gpuflow.transport.local import LocalRunner

BUCKET = "gpuflow-durable-test"
ROLE = "gpuflow-instance-role"
REGION = "us-east-1"

# argv: STEPS EVERY DELAY [pause=N]. Trains "steps" 1..STEPS (a sleep each), appending each to
# $GPUFLOW_OUTPUT_DIR/trained.txt; every EVERY steps it writes checkpoint/{state.json,variables.npz}
# (state names the variables' sha256), through a temporary directory renamed into place.  Started
# with a checkpoint it continues after its step.  pause=N: it stops at step N (after training it)
# until killed or SIGTERM.  sync: after each checkpoint it waits until the sidecar committed it.
#  SIGTERM (or term=N, at step N): it saves and exits 75.  At the end: outputs, checkpoint removed.
DURABLE_JOB = """\
import hashlib, json, os, shutil, signal, sys, time
steps, every, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
pause = [int(a[6:]) for a in sys.argv[4:] if a.startswith("pause=")]
term = [int(a[5:]) for a in sys.argv[4:] if a.startswith("term=")]
output = os.environ["GPUFLOW_OUTPUT_DIR"]
final = os.path.join(output, "checkpoint")
asked = []
signal.signal(signal.SIGTERM, lambda *_: asked.append(1))

def save(step):
    temporary = os.path.join(output, ".checkpoint.tmp-%d" % os.getpid())
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    variables = hashlib.sha256(b"%d" % step).digest() * 256
    with open(os.path.join(temporary, "variables.npz"), "wb") as handle:
        handle.write(variables)
    with open(os.path.join(temporary, "state.json"), "w") as handle:
        json.dump({"format": 1, "complete": True, "epoch": 1, "step": step,
                   "variables_sha256": hashlib.sha256(variables).hexdigest()}, handle)
    previous = os.path.join(output, ".checkpoint.previous")
    if os.path.exists(final):
        os.rename(final, previous)
    os.rename(temporary, final)
    shutil.rmtree(previous, ignore_errors=True)

def committed():
    try:
        with open(os.path.join(os.environ["GPUFLOW_RUN_DIR"], "durable.json")) as handle:
            return (json.load(handle).get("committed") or {}).get("step")
    except (OSError, ValueError):
        return None

done = 0
if os.path.exists(os.path.join(final, "state.json")):
    with open(os.path.join(final, "state.json")) as handle:
        done = json.load(handle)["step"]
    print("resumed after step %d" % done, flush=True)
for step in range(done + 1, steps + 1):
    time.sleep(delay)
    with open(os.path.join(output, "trained.txt"), "a") as handle:
        handle.write("%d\\n" % step)
    print("step %d" % step, flush=True)
    while pause and step == pause[0] and not asked:
        time.sleep(0.02)
    if asked or step in term:
        save(step)
        print("interrupted: checkpoint saved at epoch 1 step %d (resumable)" % step, flush=True)
        sys.exit(75)
    if step % every == 0 and step < steps:
        save(step)
        deadline = time.time() + 20
        while "sync" in sys.argv[4:] and time.time() < deadline and committed() != step:
            time.sleep(0.02)
with open(os.path.join(output, "metrics.json"), "w") as handle:
    json.dump({"steps": steps}, handle)
os.makedirs(os.path.join(output, "curves"), exist_ok=True)
with open(os.path.join(output, "curves", "loss.csv"), "w") as handle:
    handle.write("step,loss\\n" + "".join("%d,%g\\n" % (s, 1.0 / s) for s in range(1, steps + 1)))
shutil.rmtree(final)
print("finished", flush=True)
"""


def durable_args(steps: int = 30, every: int = 5, delay: float = 0.02, *extra: str) -> list[str]:
    return ["python", "durablejob.py", str(steps), str(every), str(delay), *extra]


def trained(output_dir: Path) -> list[int]:
    return [int(line) for line in (output_dir / "trained.txt").read_text().split()]


class RoleImds(http.server.BaseHTTPRequestHandler):
    """IMDSv2 with an instance role: token, then the role's name and its credentials."""

    tokens: set = set()

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._answer(400)
        token = secrets.token_hex(8)
        self.tokens.add(token)
        self._answer(200, token.encode())

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            return self._answer(401)
        if self.path == "/latest/meta-data/iam/security-credentials/":
            return self._answer(200, ROLE.encode())
        if self.path == f"/latest/meta-data/iam/security-credentials/{ROLE}":
            return self._answer(200, json.dumps({
                "Code": "Success", "AccessKeyId": "ASIAROLEKEY", "SecretAccessKey": "role-secret",
                "Token": "role-session-token", "Expiration": "2099-01-01T00:00:00Z"}).encode())
        self._answer(404)


@contextlib.contextmanager
def serving(handler) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """moto's server on a loopback port (S3 only is used)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="test",
                        aws_secret_access_key="test")


@pytest.fixture
def bucket(moto_s3) -> Iterator[object]:
    client = s3_client(moto_s3)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


STORE = DurableStore(region=REGION, stack_name="gpuflow-durable", bucket=BUCKET, role_name=ROLE,
                     instance_profile_name=ROLE, instance_profile_arn=f"arn:aws:iam::123456789012:instance-profile/{ROLE}")


@pytest.fixture
def durable(bucket, moto_s3, monkeypatch) -> Iterator[object]:
    """A durable store (the bucket in moto) for every cluster, an instance role behind
    IMDSv2, the sidecar pointed at moto; the log goes up every 0.3 s."""
    with serving(RoleImds) as imds:
        monkeypatch.setenv("GPUFLOW_IMDS_ENDPOINT", imds)
        monkeypatch.setenv("GPUFLOW_S3_ENDPOINT", moto_s3)
        monkeypatch.setenv("GPUFLOW_DURABLE_LOG_SECONDS", "0.3")
        monkeypatch.setenv("GPUFLOW_DURABLE_FINAL_SECONDS", "20")
        monkeypatch.setattr(locate, "store_for", lambda cluster: STORE)
        yield bucket


def keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def read(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def durable_project(tmp_path) -> Path:
    directory = tmp_path / "durable-project"
    directory.mkdir()
    (directory / "durablejob.py").write_text(DURABLE_JOB)
    return directory


def node_target(base: Path, name: str = "durablebox", sandbox: bool = True) -> RunTarget:
    """A LocalRunner "instance" at ``base`` (a second one plays the node a run moves to)."""

    def connect() -> LocalRunner:
        return LocalRunner(base)

    def push(project_dir: Path) -> None:
        runner = connect()
        for path in sorted(project_dir.iterdir()):
            if path.is_file():
                runner.put_bytes(path.read_bytes(), f"{runner.base_dir}/project/{path.name}")

    cluster = Cluster(name=name, region=REGION, instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                      price_per_hour=1.006, sandbox=sandbox)
    return RunTarget(cluster=cluster, connect=connect, sync_project=push)
