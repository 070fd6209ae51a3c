"""A node `run --recover` relaunches carries the account stack's instance profile like the node it replaces:
without it the new node's upload sidecar has no role, cannot restore the committed checkpoint from S3, and the
recovered run starts over (found by running the documented `run --up --sandbox --spot --recover --down`)."""

from __future__ import annotations

import boto3

from gpuflow import clusters
from gpuflow.clusters.relaunch import relaunch
from gpuflow.durable import stack
from infra.sandbox import in_process_sandbox


def _profile_of(instance_id: str) -> str | None:
    ec2 = boto3.client("ec2", "us-east-1")
    [instance] = [i for r in ec2.describe_instances(InstanceIds=[instance_id])["Reservations"] for i in r["Instances"]]
    return (instance.get("IamInstanceProfile") or {}).get("Arn")


def test_the_relaunched_node_has_the_instance_profile_of_the_first(gpuflow_home, tmp_path):
    with in_process_sandbox():
        arn = stack.setup("us-east-1", sandbox=True).store.instance_profile_arn
        first = clusters.up(clusters.resolve_spec("pbox", {"sandbox": True, "spot": True}, project_dir=tmp_path))
        try:
            assert first.instance_profile_arn == arn and _profile_of(first.nodes[0].instance_id) == arn
            replacement = relaunch("pbox", avoid_zone=first.nodes[0].availability_zone)
            assert _profile_of(replacement.instance_id) == arn
        finally:
            clusters.down("pbox")
