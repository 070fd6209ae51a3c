"""Shared helpers for the cluster tests: a seeded moto cloud, a provisioner
factory that never sleeps, a botocore call recorder / fault injector, and a
census of everything gpuflow could have left behind.

Imported by the test modules (not a conftest, so it cannot affect other
helpers' tests in this directory).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.client
import botocore.exceptions
import pytest

from gpuflow.provisioner import open_provisioner
from gpuflow.records import ClusterSpec

REGION = "us-east-1"
CALLER_CIDR = "203.0.113.7/32"

POLICY_PATH = Path(__file__).resolve().parents[2] / "infra" / "iam-policy.json"


def policy_allow_patterns() -> list[str]:
    """The Action patterns of infra/iam-policy.json's Allow statements."""
    policy = json.loads(POLICY_PATH.read_text())
    patterns: list[str] = []
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        actions = statement["Action"]
        patterns.extend([actions] if isinstance(actions, str) else actions)
    return patterns


# API operations whose IAM action has another name (S3's): operation -> action.
IAM_ACTION_OF_OPERATION = {
    ("s3", "ListObjectsV2"): "s3:ListBucket",
    ("s3", "DeleteObjects"): "s3:DeleteObject",
    ("s3", "ListMultipartUploads"): "s3:ListBucketMultipartUploads",
}


def policy_allows(service: str, operation: str) -> bool:
    action = IAM_ACTION_OF_OPERATION.get((service, operation), f"{service}:{operation}").lower()
    return any(fnmatch.fnmatchcase(action, pattern.lower()) for pattern in policy_allow_patterns())


@pytest.fixture
def cloud(monkeypatch) -> Iterator[Any]:
    """moto's EC2/SSM with the Deep Learning AMI seeded; yields an EC2 client
    for asserting what really exists (never for driving gpuflow)."""
    monkeypatch.setenv("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
    # moto parses ~0.5 MB of stock AMIs per region otherwise; the seeded Deep Learning AMI is all gpuflow needs.
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    import boto3

    from infra.aws.client import in_process_mock
    from infra.sandbox import seed_deep_learning_ami
    from infra.sandbox.fleet import faithful_instant_fleets

    # moto's mock, as gpuflow's own: sandbox clusters use it too (its instant fleets launch as EC2's do)
    with in_process_mock(), faithful_instant_fleets():
        seed_deep_learning_ami(REGION)
        create_spot_role()  # an account that has used spot before (tests of a missing role delete it)
        yield boto3.client("ec2", region_name=REGION)


def create_spot_role() -> None:
    """The AWSServiceRoleForEC2Spot service-linked role, as AWS names it (moto's
    create_service_linked_role would call it AWSServiceRoleForspot)."""
    import boto3

    boto3.client("iam", region_name=REGION).create_role(
        RoleName="AWSServiceRoleForEC2Spot",
        Path="/aws-service-role/spot.amazonaws.com/",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "spot.amazonaws.com"}, "Action": "sts:AssumeRole"}]}),
    )


@dataclass
class FastProvisioners:
    """A provisioner factory for the use cases: no sleeping, short timeouts;
    records the back-off delays it would have slept."""

    sleeps: list[float] = field(default_factory=list)
    poll_seconds: float = 0.0
    timeout_seconds: float = 5.0

    def __call__(self, region: str, *, profile: str | None = None, sandbox: bool = False) -> Any:
        return open_provisioner(
            region,
            profile=profile,
            sandbox=sandbox,
            sleep=self.sleeps.append,
            poll_seconds=self.poll_seconds,
            timeout_seconds=self.timeout_seconds,
        )


@pytest.fixture
def provisioners() -> FastProvisioners:
    return FastProvisioners()


def make_spec(name: str = "c1", **overrides: Any) -> ClusterSpec:
    values: dict[str, Any] = {"name": name, "region": REGION, "ssh_cidr": CALLER_CIDR}
    values.update(overrides)
    return ClusterSpec(**values)


@dataclass
class ApiCalls:
    """Records every botocore call; optionally fails chosen ones."""

    calls: list[str] = field(default_factory=list)
    gpuflow_calls: list[tuple[str, str]] = field(default_factory=list)  # (service, operation) made by gpuflow
    params: list[dict[str, Any]] = field(default_factory=list)
    # (operation, predicate(call index of that operation, params) -> exception or None, after the real call?)
    faults: list[tuple[str, Callable[[int, dict[str, Any]], BaseException | None], bool]] = field(default_factory=list)

    def fail(self, operation: str, *, code: str = "InjectedFailure", nth: int | None = None, times: int | None = None,
             when: Callable[[dict[str, Any]], bool] | None = None, exception: BaseException | None = None,
             lose_response: bool = False) -> None:
        """Make ``operation`` fail: its ``nth`` call only (0-based), or its first
        ``times`` calls, or every call; optionally only when ``when(params)``.
        ``lose_response``: AWS performs the call, the answer never arrives."""
        state = {"failed": 0}

        def predicate(index: int, params: dict[str, Any]) -> BaseException | None:
            if when is not None and not when(params):
                return None
            if nth is not None and index != nth:
                return None
            if times is not None and state["failed"] >= times:
                return None
            state["failed"] += 1
            if exception is not None:
                return exception
            return botocore.exceptions.ClientError(
                {"Error": {"Code": code, "Message": f"injected failure of {operation}"}}, operation
            )

        self.faults.append((operation, predicate, lose_response))

    def count(self, operation: str) -> int:
        return self.calls.count(operation)


@pytest.fixture
def api_calls(monkeypatch) -> Iterator[ApiCalls]:
    """Patch botocore's one funnel for API calls: record each, inject faults.

    At teardown every operation gpuflow made in the test must be allowed by
    infra/iam-policy.json, so each test that records calls also checks the policy."""
    recorder = ApiCalls()
    original = botocore.client.BaseClient._make_api_call

    def recording(client: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        index = recorder.calls.count(operation_name)
        recorder.calls.append(operation_name)
        recorder.params.append(api_params)
        if "gpuflow" in (client.meta.config.user_agent_extra or ""):  # gpuflow's clients, not the test's own
            recorder.gpuflow_calls.append((client.meta.service_model.signing_name, operation_name))
        for operation, predicate, lose_response in recorder.faults:
            if operation == operation_name:
                failure = predicate(index, api_params)
                if failure is not None:
                    if lose_response:
                        original(client, operation_name, api_params)
                    raise failure
        return original(client, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    yield recorder
    refused = sorted({f"{service}:{operation}" for service, operation in recorder.gpuflow_calls
                      if not policy_allows(service, operation)})
    assert refused == [], f"infra/iam-policy.json does not allow {refused}"


def tag_filter(key: str, value: str) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{key}", "Values": [value]}]


def leftovers(ec2: Any, home: Path, name: str | None = None) -> dict[str, list[str]]:
    """Everything gpuflow-made that still exists (for cluster ``name`` or all)."""
    filters = tag_filter("gpuflow:managed", "true") + (tag_filter("gpuflow:cluster", name) if name else [])
    instances = [
        instance["InstanceId"]
        for reservation in ec2.describe_instances(Filters=filters)["Reservations"]
        for instance in reservation["Instances"]
        if instance["State"]["Name"] != "terminated"
    ]
    groups = [group["GroupId"] for group in ec2.describe_security_groups(Filters=filters)["SecurityGroups"]]
    keys = [key["KeyName"] for key in ec2.describe_key_pairs(Filters=filters)["KeyPairs"]]
    templates = [template["LaunchTemplateId"]
                 for template in ec2.describe_launch_templates(Filters=filters)["LaunchTemplates"]]
    volumes = [
        volume["VolumeId"]
        for volume in ec2.describe_volumes(Filters=filters)["Volumes"]
        if volume["State"] not in ("deleted", "deleting")
    ]
    state_dir = home / "state" / "clusters"
    states = sorted(
        path.name
        for path in state_dir.glob("*.json")
        if (name is None or path.stem == name) and '"phase": "deleted"' not in path.read_text()
    ) if state_dir.is_dir() else []
    key_files = sorted(path.name for path in (home / "keys").glob("*.pem")) if (home / "keys").is_dir() else []
    if name is not None:
        key_files = [key for key in key_files if key == f"{name}.pem"]
    found = {
        "instances": instances,
        "security_groups": groups,
        "key_pairs": keys,
        "launch_templates": templates,
        "volumes": volumes,
        "state": states,
        "key_files": key_files,
    }
    return {kind: items for kind, items in found.items() if items}


@contextlib.contextmanager
def no_network_detector() -> Iterator[Callable[[], str]]:
    """A caller-IP detector that fails the test if called."""

    def detector() -> str:
        raise AssertionError("caller IP detection must not run here")

    yield detector
