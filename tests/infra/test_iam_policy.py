"""infra/iam-policy.json allows every AWS operation gpuflow makes, and no more
than it needs: the calls are recorded from real lifecycle runs against moto."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from gpuflow import clusters
from tests.infra.cloud import (  # noqa: F401 - fixtures
    RECORDED_OPERATIONS,
    api_calls,
    cloud,
    leftovers,
    make_spec,
    provisioners,
)

POLICY_PATH = Path(__file__).resolve().parents[2] / "infra" / "iam-policy.json"


def _allow_patterns() -> list[str]:
    policy = json.loads(POLICY_PATH.read_text())
    patterns: list[str] = []
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        actions = statement["Action"]
        patterns.extend([actions] if isinstance(actions, str) else actions)
    return patterns


def allowed(service: str, operation: str) -> bool:
    action = f"{service}:{operation}".lower()
    return any(fnmatch.fnmatchcase(action, pattern.lower()) for pattern in _allow_patterns())


def test_policy_is_narrow():
    patterns = _allow_patterns()
    assert "*" not in patterns and "ec2:*" not in patterns
    assert not any(pattern.lower().startswith("iam:") for pattern in patterns)  # no PassRole: no credentials on instances
    assert not allowed("ec2", "DeleteVpc")
    assert not allowed("ec2", "ModifyInstanceAttribute")
    assert allowed("ec2", "RunInstances")


def test_every_operation_of_the_lifecycle_is_allowed(cloud, provisioners, api_calls, gpuflow_home, tmp_path):
    spot = clusters.up(make_spec("iam-spot", spot=True, count=2), provisioner_factory=provisioners)
    clusters.status("iam-spot", provisioner_factory=provisioners)
    clusters.list_clusters(provisioner_factory=provisioners)
    clusters.console_output(spot, spot.head.instance_id, provisioner_factory=provisioners)
    clusters.instance_state(spot, spot.head.instance_id, provisioner_factory=provisioners)
    clusters.up(make_spec("iam-spot"), provisioner_factory=provisioners)  # already up
    clusters.down("iam-spot", provisioner_factory=provisioners)

    orphan = clusters.up(make_spec("iam-orphan"), provisioner_factory=provisioners)
    (gpuflow_home / "state" / "clusters" / "iam-orphan.json").unlink()  # forgotten locally
    clusters.reap(provisioner_factory=provisioners)
    clusters.reap(yes=True, provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}
    assert orphan.head.instance_id

    made = set(api_calls.gpuflow_calls)
    for expected in ("RunInstances", "TerminateInstances", "CreateSecurityGroup", "DeleteSecurityGroup",
                     "AuthorizeSecurityGroupIngress", "CreateKeyPair", "DeleteKeyPair", "GetConsoleOutput",
                     "DescribeSpotPriceHistory", "DescribeVolumes", "DescribeSpotInstanceRequests"):
        assert ("ec2", expected) in made
    assert ("ssm", "GetParameter") in made
    refused = sorted(f"{service}:{operation}" for service, operation in made if not allowed(service, operation))
    assert refused == [], f"infra/iam-policy.json does not allow {refused}"


def test_operations_recorded_by_the_other_tests_are_allowed():
    """Whatever gpuflow called in the tests that ran before this one (the
    lifecycle, fault and fallback tests when the directory runs together)."""
    refused = sorted(f"{service}:{operation}" for service, operation in RECORDED_OPERATIONS if not allowed(service, operation))
    assert refused == [], f"infra/iam-policy.json does not allow {refused}"
