"""The sandbox node's IMDSv2 (infra/sandbox/imds.py), asked over loopback HTTP as the
watcher and a sidecar on an instance ask EC2's; and its spot reclaim in moto."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest

from gpuflow.jobs.imds_watch import Imds
from infra.sandbox.imds import (
    CONTROL_NAME,
    InstanceMetadata,
    InterruptionRequest,
    MetadataServer,
    read_request,
    write_request,
)

META = "/latest/meta-data/"


def _request(server, method, path, headers=None):
    parts = urllib.parse.urlsplit(server.endpoint)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture
def clock():
    now = [1_800_000_000.0]
    return now


@pytest.fixture
def serve(tmp_path, clock):
    servers = []

    def start(role=None):
        node_dir = tmp_path / "node"
        node_dir.mkdir(exist_ok=True)
        metadata = InstanceMetadata("i-0123456789abcdef0", "g5.xlarge", "us-east-1b", role)
        server = MetadataServer(metadata, node_dir, clock=lambda: clock[0]).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _token(server, ttl="60"):
    status, body = _request(server, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
    assert status == 200 and body
    return body


def test_a_token_is_required_and_needs_a_ttl(serve, clock):
    server = serve()
    assert _request(server, "GET", META + "instance-id")[0] == 401
    assert _request(server, "GET", META + "instance-id", {"X-aws-ec2-metadata-token": "made-up"})[0] == 401
    assert _request(server, "PUT", "/latest/api/token")[0] == 400
    for bad in ("0", "21601", "ten"):
        assert _request(server, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": bad})[0] == 400
    token = _token(server, "60")
    assert _request(server, "GET", META + "instance-id", {"X-aws-ec2-metadata-token": token}) == (
        200, "i-0123456789abcdef0")
    clock[0] += 61  # expired: a new token is needed
    assert _request(server, "GET", META + "instance-id", {"X-aws-ec2-metadata-token": token})[0] == 401


def test_it_says_who_the_instance_is_and_serves_the_notice_only_once_interrupted(serve, tmp_path):
    server = serve()
    imds = Imds(server.endpoint)  # the watcher's own client
    assert imds.get(META + "instance-type") == (200, b"g5.xlarge")
    assert imds.get(META + "placement/availability-zone") == (200, b"us-east-1b")
    assert imds.get(META + "spot/instance-action")[0] == 404
    assert imds.get(META + "events/recommendations/rebalance")[0] == 404
    assert imds.get(META + "iam/security-credentials/")[0] == 404  # launched without an instance profile
    request = InterruptionRequest("i-0123456789abcdef0", requested_at=1_800_000_000.0, terminate_at=1_800_000_010.0)
    write_request(tmp_path / "node", request)
    status, body = imds.get(META + "spot/instance-action")
    assert status == 200 and json.loads(body) == {"action": "terminate", "time": "2027-01-15T08:00:10Z"}
    assert read_request(tmp_path / "node") == request
    with pytest.raises(FileExistsError):  # one interruption per node
        write_request(tmp_path / "node", request)
    assert [path.name for path in (tmp_path / "node").iterdir()] == [CONTROL_NAME]


def test_role_credentials_only_with_an_instance_profile(serve, clock):
    server = serve(role="gpuflow-instance-role")
    imds = Imds(server.endpoint)
    assert imds.get(META + "iam/security-credentials/") == (200, b"gpuflow-instance-role")
    status, body = imds.get(META + "iam/security-credentials/gpuflow-instance-role")
    credentials = json.loads(body)
    assert status == 200 and credentials["Code"] == "Success" and credentials["AccessKeyId"].startswith("ASIA")
    assert {"SecretAccessKey", "Token", "Expiration"} <= set(credentials)
    assert imds.get(META + "iam/security-credentials/another-role")[0] == 404
    # The same credentials until an hour before they expire, then new ones.
    assert json.loads(imds.get(META + "iam/security-credentials/gpuflow-instance-role")[1]) == credentials
    clock[0] += 5.5 * 3600
    assert json.loads(imds.get(META + "iam/security-credentials/gpuflow-instance-role")[1]) != credentials


def test_the_keeper_serves_a_node_and_reclaims_it_as_spot(tmp_path):
    """In-process moto: an instance tagged by gpuflow whose directory exists gets an IMDS;
    a due request ends it: discarded (its directory), terminated with the spot reason."""
    import boto3

    from infra.sandbox import in_process_sandbox

    discarded = []

    def discard(instance_id, cluster):
        discarded.append((instance_id, cluster))
        (tmp_path / cluster / instance_id / CONTROL_NAME).unlink()
        (tmp_path / cluster / instance_id / "imds-endpoint").unlink()
        (tmp_path / cluster / instance_id).rmdir()

    with in_process_sandbox(sandbox_root=tmp_path, discard_instance=discard) as amis:
        ec2 = boto3.client("ec2", region_name="us-east-1")
        [instance] = ec2.run_instances(
            ImageId=amis["us-east-1"], MinCount=1, MaxCount=1, InstanceType="g5.xlarge",
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "gpuflow:cluster", "Value": "box"}]}],
        )["Instances"]
        node_dir = tmp_path / "box" / instance["InstanceId"]
        node_dir.mkdir(parents=True)
        deadline = time.monotonic() + 10
        while not (node_dir / "imds-endpoint").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        endpoint = (node_dir / "imds-endpoint").read_text().strip()
        assert Imds(endpoint).get(META + "instance-id") == (200, instance["InstanceId"].encode())
        write_request(node_dir, InterruptionRequest(instance["InstanceId"], time.time(), time.time()))

        def described():
            return ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][0]

        while described()["State"]["Name"] != "terminated" and time.monotonic() < deadline:
            time.sleep(0.02)
        described = described()
        assert described["State"]["Name"] == "terminated" and not node_dir.exists()
        assert described["StateReason"]["Code"] == "Server.SpotInstanceTermination"
        assert discarded == [(instance["InstanceId"], "box")]


def test_the_node_and_its_supervisor_agree_on_where_the_endpoint_is(tmp_path):
    from gpuflow.jobs import imds_watch, scripts
    from infra.sandbox.imds import ENDPOINT_NAME

    assert imds_watch.NODE_ENDPOINT_FILE == ENDPOINT_NAME
    assert f'"$base_dir/{ENDPOINT_NAME}"' in scripts._SUPERVISOR_TEMPLATE
    run_dir = tmp_path / "base" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    assert imds_watch.node_endpoint(str(run_dir), wait=0) is None  # an EC2 instance: none
    (tmp_path / "base" / ENDPOINT_NAME).write_text("http://127.0.0.1:4242\n")
    assert imds_watch.node_endpoint(str(run_dir), wait=0) == "http://127.0.0.1:4242"


@pytest.mark.parametrize("document", [
    "not json", "[]", '{"instance_id": "i-1"}',
    '{"instance_id": "i-1", "requested_at": NaN, "terminate_at": 1}',
    '{"instance_id": "i-1", "requested_at": 10, "terminate_at": 5}',
    '{"instance_id": "i-1", "requested_at": 1, "terminate_at": 1e300}',
    '{"instance_id": "i-1", "requested_at": 1, "terminate_at": 2, "action": "reboot"}',
])
def test_a_request_that_does_not_parse_is_no_request(serve, tmp_path, document):
    server = serve()
    (tmp_path / "node" / CONTROL_NAME).write_text(document)
    assert read_request(tmp_path / "node") is None
    assert Imds(server.endpoint).get(META + "spot/instance-action")[0] == 404
