"""infra/iam-policy.json allows every AWS operation gpuflow makes, and no more
than it needs: the calls are recorded from real lifecycle runs against moto."""

from __future__ import annotations

import json

from gpuflow import clusters
from gpuflow.clusters.relaunch import relaunch
from tests.infra.cloud import (
    POLICY_PATH,
    leftovers,
    make_spec,
    policy_allow_patterns,
    policy_allows,
)

allowed = policy_allows


def test_policy_is_narrow():
    patterns = policy_allow_patterns()
    assert "*" not in patterns and "ec2:*" not in patterns
    # IAM: reading whether the spot service-linked role exists, and the account stack's one role and
    # profile (CloudFormation makes them with the caller's rights; PassRole only to EC2): nothing else.
    statements = json.loads(POLICY_PATH.read_text())["Statement"]
    iam_resources = {}
    for item in statements:
        for action in item["Action"]:
            if action.lower().startswith("iam:"):
                resources = item["Resource"] if isinstance(item["Resource"], list) else [item["Resource"]]
                iam_resources.setdefault(action, []).extend(resources)
    stack_role = ["arn:aws:iam::*:role/gpuflow-instance-*", "arn:aws:iam::*:instance-profile/gpuflow-instance-*"]
    assert iam_resources.pop("iam:GetRole") == [
        "arn:aws:iam::*:role/aws-service-role/spot.amazonaws.com/AWSServiceRoleForEC2Spot", *stack_role]
    assert iam_resources.pop("iam:PassRole") == ["arn:aws:iam::*:role/gpuflow-instance-*"]
    assert all(resources == stack_role for resources in iam_resources.values()), iam_resources
    [passing] = [item for item in statements if "iam:PassRole" in item["Action"]]
    assert passing["Action"] == ["iam:PassRole"]
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert not allowed("iam", "CreateServiceLinkedRole") and not allowed("iam", "CreateUser")
    assert not allowed("iam", "AttachRolePolicy") and not allowed("iam", "CreateAccessKey")
    # CloudFormation and S3: only the account stack's name and its buckets.
    for item in statements:
        services = {action.split(":")[0] for action in item["Action"]}
        if "cloudformation" in services:
            assert services == {"cloudformation"} and item["Resource"] == "arn:aws:cloudformation:*:*:stack/gpuflow-account/*"
        if "s3" in services:
            assert services == {"s3"} and item["Resource"] in ("arn:aws:s3:::gpuflow-runs-*", "arn:aws:s3:::gpuflow-runs-*/*")
    assert not allowed("cloudformation", "CreateStack") and not allowed("s3", "PutBucketAcl")
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
    relaunch("iam-spot", avoid_zone=spot.head.availability_zone, provisioner_factory=provisioners)  # run --recover's
    clusters.down("iam-spot", provisioner_factory=provisioners)

    orphan = clusters.up(make_spec("iam-orphan"), provisioner_factory=provisioners)
    (gpuflow_home / "state" / "clusters" / "iam-orphan.json").unlink()  # forgotten locally
    clusters.reap(provisioner_factory=provisioners)
    clusters.reap(yes=True, provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}
    [orphan_instance] = [instance for reservation in cloud.describe_instances(InstanceIds=[orphan.head.instance_id])[
        "Reservations"] for instance in reservation["Instances"]]
    assert orphan_instance["State"]["Name"] == "terminated"  # reap found the orphan and made its calls

    made = set(api_calls.gpuflow_calls)
    for expected in ("RunInstances", "TerminateInstances", "CreateSecurityGroup", "DeleteSecurityGroup",
                     "AuthorizeSecurityGroupIngress", "CreateKeyPair", "DeleteKeyPair", "GetConsoleOutput",
                     "DescribeSpotPriceHistory", "DescribeVolumes", "DescribeSpotInstanceRequests",
                     "CreateFleet", "CreateLaunchTemplate", "DeleteLaunchTemplate", "DescribeLaunchTemplates"):
        assert ("ec2", expected) in made
    assert ("ssm", "GetParametersByPath") in made
    assert ("iam", "GetRole") in made  # --spot checks the service-linked role
    refused = sorted(f"{service}:{operation}" for service, operation in made if not allowed(service, operation))
    assert refused == [], f"infra/iam-policy.json does not allow {refused}"


def test_a_call_outside_the_policy_fails_the_recording_test(cloud, monkeypatch):
    """The api_calls fixture's teardown check bites: a refused operation made by
    a gpuflow client is reported (here: one the policy deliberately omits)."""
    import inspect

    from tests.infra import cloud as cloud_module

    generator = inspect.unwrap(cloud_module.api_calls)(monkeypatch)
    recorder = next(generator)
    recorder.gpuflow_calls.append(("ec2", "DeleteVpc"))
    try:
        next(generator)
    except AssertionError as exc:
        assert "ec2:DeleteVpc" in str(exc)
    else:  # pragma: no cover - the check did not fire
        raise AssertionError("the policy check in api_calls did not fire")
