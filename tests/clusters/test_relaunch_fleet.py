"""`run --recover`'s relaunch goes through EC2 Fleet (CreateFleet type `instant`) from a launch template made
for it: the template carries exactly `up`'s launch settings, the fleet the candidate pools, the template is
deleted right after (or by `down`/`reap` when that fails), and no capacity moves on to the next step.
moto builds the state (its instant fleets made faithful by the sandbox, infra/sandbox/fleet.py); gpuflow acts."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import botocore.client
import pytest

from gpuflow import clusters
from gpuflow.clusters import reaper
from gpuflow.clusters.relaunch import relaunch
from gpuflow.errors import CapacityError, GpuflowError
from infra.tags import TAG_EXPIRES_AT
from tests.infra.cloud import (  # noqa: F401 - fixtures
    POLICY_PATH,
    api_calls,
    cloud,
    leftovers,
    make_spec,
    policy_allows,
    provisioners,
)

NO_CAPACITY = {"FleetId": "fleet-00000000-0000-0000-0000-000000000000", "Instances": [], "Errors": [
    {"ErrorCode": "InsufficientInstanceCapacity", "ErrorMessage": "no capacity (injected)", "Lifecycle": "spot"}]}


def _params(api_calls, operation: str) -> list[dict[str, Any]]:
    return [params for name, params in zip(api_calls.calls, api_calls.params) if name == operation]


def _instance(cloud, instance_id: str) -> dict[str, Any]:
    [instance] = [i for r in cloud.describe_instances(InstanceIds=[instance_id])["Reservations"] for i in r["Instances"]]
    return instance


def _tags(specifications: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {spec["ResourceType"]: {tag["Key"]: tag["Value"] for tag in spec["Tags"] if tag["Key"] != TAG_EXPIRES_AT}
            for spec in specifications}


def _answer_fleets(monkeypatch, answer) -> list[dict[str, Any]]:
    """CreateFleet answered by ``answer(index, params, real)`` (``real(params)`` makes the real call,
    recorded by api_calls); returns the params of every CreateFleet asked."""
    inner = botocore.client.BaseClient._make_api_call
    asked: list[dict[str, Any]] = []

    def patched(client, operation, params):
        if operation != "CreateFleet":
            return inner(client, operation, params)
        asked.append(params)
        return answer(len(asked) - 1, params, lambda changed: inner(client, operation, changed))

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", patched)
    return asked


def _overrides(params: dict[str, Any]) -> list[tuple[str, str]]:
    [config] = params["LaunchTemplateConfigs"]
    return [(override["InstanceType"], override["SubnetId"]) for override in config["Overrides"]]


def test_relaunch_is_one_fleet_from_a_template_with_the_settings_of_up(cloud, provisioners, api_calls, gpuflow_home):
    first = clusters.up(make_spec("fl", spot=True, disk_gb=150), provisioner_factory=provisioners)
    zone = first.nodes[0].availability_zone
    said: list[str] = []
    replacement = relaunch("fl", avoid_zone=zone, progress=said.append, provisioner_factory=provisioners)

    assert api_calls.count("RunInstances") == 1  # up's: the relaunch is the fleet's
    [fleet] = _params(api_calls, "CreateFleet")
    assert fleet["Type"] == "instant"
    assert fleet["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized"
    assert fleet["SpotOptions"]["MinTargetCapacity"] == 1 and fleet["SpotOptions"]["SingleAvailabilityZone"] is True
    assert fleet["TargetCapacitySpecification"] == {"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "spot"}
    subnet_zone = {s["SubnetId"]: s["AvailabilityZone"] for s in cloud.describe_subnets()["Subnets"]}
    pools = [(kind, subnet_zone[subnet]) for kind, subnet in _overrides(fleet)]
    assert pools and all(kind == "g5.xlarge" and where != zone for kind, where in pools)  # the other zones first

    # The template: exactly up's settings (one builder), its tags, its user data.
    [up_call] = _params(api_calls, "RunInstances")
    [made] = _params(api_calls, "CreateLaunchTemplate")
    data = made["LaunchTemplateData"]
    per_launch = {"InstanceType", "MinCount", "MaxCount", "SubnetId", "ClientToken", "InstanceMarketOptions"}
    assert {k: v for k, v in data.items() if k not in {"UserData", "TagSpecifications"}} == {
        k: v for k, v in up_call.items() if k not in per_launch | {"UserData", "TagSpecifications"}}
    assert data["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}
    assert data["UserData"] == up_call["UserData"]  # base64 of the same dead-man's switch (botocore encoded up's)
    assert base64.b64decode(data["UserData"]).startswith(b"#!/bin/bash")
    assert _tags(data["TagSpecifications"]) == _tags(up_call["TagSpecifications"])
    assert made["LaunchTemplateName"].startswith("gpuflow-fl-")
    template_tags = _tags(made["TagSpecifications"])["launch-template"]
    launch_tags = _tags(up_call["TagSpecifications"])["volume"]
    for key in ("gpuflow:owner-id", "gpuflow:cluster", "gpuflow:launch-id", "gpuflow:managed"):
        assert template_tags[key] == launch_tags[key]
    [deleted] = _params(api_calls, "DeleteLaunchTemplate")
    assert cloud.describe_launch_templates()["LaunchTemplates"] == []  # deleted right after the fleet call
    assert deleted["LaunchTemplateId"]

    # The node EC2 launched carries those settings.
    instance = _instance(cloud, replacement.instance_id)
    assert instance["Placement"]["AvailabilityZone"] == replacement.availability_zone != zone
    assert [group["GroupId"] for group in instance["SecurityGroups"]] == [first.security_group_id]
    assert instance["KeyName"] == first.key_name and instance["InstanceLifecycle"] == "spot"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert {tag["Key"]: tag["Value"] for tag in instance["Tags"]}["gpuflow:launch-id"] == launch_tags["gpuflow:launch-id"]
    [volume] = cloud.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [replacement.instance_id]}])[
        "Volumes"]
    assert (volume["Size"], volume["VolumeType"], volume["Encrypted"]) == (150, "gp3", True)
    assert {tag["Key"]: tag["Value"] for tag in volume["Tags"]}["gpuflow:owner-id"] == launch_tags["gpuflow:owner-id"]
    assert clusters.get_cluster("fl").nodes[0].instance_id == replacement.instance_id

    clusters.down("fl", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}
    for operation in ("CreateFleet", "CreateLaunchTemplate", "DeleteLaunchTemplate", "DescribeLaunchTemplates"):
        assert ("ec2", operation) in api_calls.gpuflow_calls and policy_allows("ec2", operation)


def test_no_capacity_moves_on_other_zones_then_fallback_types_then_on_demand(
    cloud, provisioners, api_calls, monkeypatch, gpuflow_home
):
    first = clusters.up(make_spec("fb", spot=True, spot_fallback=True), provisioner_factory=provisioners)
    zone = first.nodes[0].availability_zone
    fleets = _answer_fleets(monkeypatch, lambda index, params, real: NO_CAPACITY if index < 2 else real(params))
    replacement = relaunch("fb", fallback_types=("g4dn.xlarge",), avoid_zone=zone, provisioner_factory=provisioners)
    subnet_zone = {s["SubnetId"]: s["AvailabilityZone"] for s in cloud.describe_subnets()["Subnets"]}
    steps = [(params["TargetCapacitySpecification"]["DefaultTargetCapacityType"],
              [(kind, subnet_zone[subnet]) for kind, subnet in _overrides(params)]) for params in fleets]
    assert [market for market, _pools in steps] == ["spot", "spot", "on-demand"]
    assert {kind for kind, _ in steps[0][1]} == {"g5.xlarge"} and zone not in {where for _, where in steps[0][1]}
    assert ("g5.xlarge", zone) in steps[1][1] and {kind for kind, _ in steps[1][1]} == {"g5.xlarge", "g4dn.xlarge"}
    assert steps[2][1][0][0] == "g5.xlarge" and {kind for kind, _ in steps[2][1]} == {"g5.xlarge", "g4dn.xlarge"}
    assert fleets[2]["OnDemandOptions"]["AllocationStrategy"] == "prioritized"  # the type asked for first
    assert (replacement.instance_type, replacement.market) == ("g5.xlarge", "on-demand")
    assert _instance(cloud, replacement.instance_id).get("InstanceLifecycle") != "spot"
    # One template per market (the spot one tags spot requests), each deleted.
    assert len(_params(api_calls, "CreateLaunchTemplate")) == 2 == len(_params(api_calls, "DeleteLaunchTemplate"))
    assert cloud.describe_launch_templates()["LaunchTemplates"] == []
    assert sum("InsufficientInstanceCapacity" in failure for failure in replacement.failed_attempts) == 2
    clusters.down("fb", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_a_partial_fleet_is_terminated_and_the_next_step_launches_every_node_in_one_zone(
    cloud, provisioners, api_calls, monkeypatch, gpuflow_home
):
    first = clusters.up(make_spec("pf", spot=True, count=2), provisioner_factory=provisioners)

    def half_first(index, params, real):
        if index == 0:  # EC2 answered with one node of two (moto ignores MinTargetCapacity)
            return real({**params, "TargetCapacitySpecification": {**params["TargetCapacitySpecification"],
                                                                   "TotalTargetCapacity": 1}})
        return real(params)

    asked = _answer_fleets(monkeypatch, half_first)
    replacement = relaunch("pf", avoid_zone=first.nodes[0].availability_zone, provisioner_factory=provisioners)
    assert len(asked) == 2
    states = {i["InstanceId"]: (i["State"]["Name"], i["Placement"]["AvailabilityZone"])
              for r in cloud.describe_instances()["Reservations"] for i in r["Instances"]}
    nodes = clusters.get_cluster("pf").nodes
    assert len(nodes) == 2 and all(states[node.instance_id][0] == "running" for node in nodes)
    assert len({states[node.instance_id][1] for node in nodes}) == 1
    assert sum(state == "running" for state, _zone in states.values()) == 2  # the half-launched one is gone
    assert any("1 of 2 launched" in failure for failure in replacement.failed_attempts)
    clusters.down("pf", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_failures_of_each_fleet_operation_launch_nothing_and_leave_nothing(
    cloud, provisioners, api_calls, monkeypatch, gpuflow_home
):
    """One cluster relaunched four times, each failing another way; the interrupted node is terminated
    by the first, the record keeps naming the cluster, so each next relaunch starts from there."""
    first = clusters.up(make_spec("nc", spot=True), provisioner_factory=provisioners)
    zone = first.nodes[0].availability_zone

    def live() -> list[str]:
        return [i["InstanceId"] for r in cloud.describe_instances()["Reservations"] for i in r["Instances"]
                if i["State"]["Name"] != "terminated"]

    # No capacity anywhere: every step tried, nothing launched, one line saying what was tried.
    answers = {"fleet": NO_CAPACITY}
    asked = _answer_fleets(monkeypatch, lambda index, params, real: answers["fleet"] if answers["fleet"] else real(params))
    with pytest.raises(CapacityError) as refused:
        relaunch("nc", fallback_types=("g4dn.xlarge",), avoid_zone=zone, provisioner_factory=provisioners)
    assert "no capacity to relaunch a node of nc" in refused.value.message and len(asked) == 2
    assert refused.value.message.count("InsufficientInstanceCapacity") == 2 and "g4dn.xlarge (spot)" in refused.value.message
    assert "--spot-fallback" in (refused.value.hint or "")
    assert live() == []  # the interrupted node terminated first, nothing launched
    assert cloud.describe_launch_templates()["LaunchTemplates"] == []

    # A refusal in the instant fleet's Errors is not "no capacity": no other step, one clear line.
    answers["fleet"] = {"FleetId": "fleet-1", "Instances": [], "Errors": [{
        "ErrorCode": "AuthFailure.ServiceLinkedRoleCreationNotPermitted", "ErrorMessage": "no role", "Lifecycle": "spot"}]}
    with pytest.raises(GpuflowError) as refused:
        relaunch("nc", fallback_types=("g4dn.xlarge",), avoid_zone=zone, provisioner_factory=provisioners)
    assert not isinstance(refused.value, CapacityError) and len(asked) == 3
    assert "ServiceLinkedRoleCreationNotPermitted" in refused.value.message
    assert "ec2fleet.amazonaws.com" in (refused.value.hint or "")
    assert live() == [] and cloud.describe_launch_templates()["LaunchTemplates"] == []

    # CreateFleet itself refused: its template is deleted all the same.
    answers["fleet"] = None
    api_calls.fail("CreateFleet", code="InvalidParameterValue", times=1)
    deletions = api_calls.count("DeleteLaunchTemplate")
    with pytest.raises(GpuflowError) as refused:
        relaunch("nc", avoid_zone=zone, provisioner_factory=provisioners)
    assert "InvalidParameterValue" in refused.value.message and not isinstance(refused.value, CapacityError)
    assert api_calls.count("DeleteLaunchTemplate") == deletions + 1
    assert live() == [] and cloud.describe_launch_templates()["LaunchTemplates"] == []

    # CreateLaunchTemplate's answer lost: EC2 made it, gpuflow never heard; `down` finds it by its tags.
    api_calls.fail("CreateLaunchTemplate", exception=ConnectionError("answer lost"), lose_response=True, times=1)
    fleets = len(asked)
    with pytest.raises(ConnectionError):
        relaunch("nc", avoid_zone=zone, provisioner_factory=provisioners)
    assert len(asked) == fleets and live() == []
    [template] = cloud.describe_launch_templates()["LaunchTemplates"]
    assert {tag["Key"]: tag["Value"] for tag in template["Tags"]}["gpuflow:cluster"] == "nc"
    clusters.down("nc", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_a_template_that_could_not_be_deleted_is_reaped(cloud, provisioners, api_calls, monkeypatch, gpuflow_home):
    first = clusters.up(make_spec("dt", spot=True), provisioner_factory=provisioners)
    api_calls.fail("DeleteLaunchTemplate", times=1)
    said: list[str] = []
    replacement = relaunch("dt", avoid_zone=first.nodes[0].availability_zone, progress=said.append,
                           provisioner_factory=provisioners)
    assert _instance(cloud, replacement.instance_id)["State"]["Name"] == "running"  # the relaunch itself succeeded
    assert any("could not delete launch template gpuflow-dt-" in line for line in said)
    [template] = cloud.describe_launch_templates()["LaunchTemplates"]
    # The cluster is live: a fresh template may be a relaunch in flight, so reap leaves it ...
    assert "launch-template" not in {item.kind for item in clusters.reap(provisioner_factory=provisioners).items}
    # ... and takes it once past the grace, leaving the live cluster alone.
    monkeypatch.setattr(reaper, "LAUNCH_TEMPLATE_GRACE", datetime.timedelta(0))
    report = clusters.reap(yes=True, provisioner_factory=provisioners)
    assert [(item.kind, item.resource_id) for item in report.items] == [("launch-template", template["LaunchTemplateId"])]
    assert cloud.describe_launch_templates()["LaunchTemplates"] == []
    assert clusters.get_cluster("dt").nodes[0].instance_id == replacement.instance_id  # still up
    clusters.down("dt", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_the_policy_allows_the_fleet_path_only_on_what_gpuflow_tagged():
    import json

    statements = json.loads(POLICY_PATH.read_text())["Statement"]
    fleet_actions = {"ec2:CreateFleet", "ec2:CreateLaunchTemplate", "ec2:DeleteLaunchTemplate"}
    for statement in statements:
        actions = set(statement["Action"])
        if not actions & fleet_actions:
            continue
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        condition = statement.get("Condition", {}).get("StringEquals", {})
        tagged = condition.get("aws:RequestTag/gpuflow:managed") == "true" or condition.get(
            "aws:ResourceTag/gpuflow:managed") == "true"
        # Untagged only where nothing is made or changed: the image, subnet, group, key... a launch uses.
        assert tagged or (actions == {"ec2:CreateFleet"} and not any(
            kind in resource for resource in resources for kind in ("instance/", "volume/", "fleet/", "launch-template/")))
        if "ec2:DeleteLaunchTemplate" in actions:
            assert condition == {"aws:ResourceTag/gpuflow:managed": "true"}
    [tagging] = [statement for statement in statements if statement["Action"] == ["ec2:CreateTags"]]
    assert {"CreateLaunchTemplate", "CreateFleet"} <= set(tagging["Condition"]["StringEquals"]["ec2:CreateAction"])
    assert policy_allows("ec2", "DescribeLaunchTemplates") and not policy_allows("ec2", "DeleteFleets")
    assert not policy_allows("ec2", "ModifyLaunchTemplate") and not policy_allows("ec2", "CreateLaunchTemplateVersion")


def test_launch_steps_spot_other_zones_then_the_rest_then_on_demand_in_order():
    from gpuflow.clusters.relaunch import launch_order, launch_steps

    zones = {"g5.xlarge": ["a", "b", "c"], "g6.xlarge": ["a", "d"]}
    pools_of = lambda candidate: [(f"subnet-{zone}", zone) for zone in candidate.zones]  # noqa: E731
    order = launch_order("g5.xlarge", ["g6.xlarge"], zones, spot=True, spot_fallback=True, avoid_zone="a")
    steps = [(step.market, [(pool.instance_type, pool.availability_zone) for pool in step.pools])
             for step in launch_steps(order, pools_of, avoid_zone="a")]
    assert steps == [
        ("spot", [("g5.xlarge", "b"), ("g5.xlarge", "c")]),
        ("spot", [("g5.xlarge", "a"), ("g6.xlarge", "d"), ("g6.xlarge", "a")]),
        ("on-demand", [("g5.xlarge", "b"), ("g5.xlarge", "c"), ("g5.xlarge", "a"), ("g6.xlarge", "d"), ("g6.xlarge", "a")]),
    ]
    # An on-demand cluster: one prioritized call, the interrupted zone last; spot without --spot-fallback: no on-demand.
    on_demand = launch_order("g5.xlarge", [], zones, spot=False, spot_fallback=False, avoid_zone="b")
    assert [[pool.availability_zone for pool in step.pools] for step in launch_steps(on_demand, pools_of, avoid_zone="b")] == [
        ["a", "c", "b"]]
    spot_only = launch_order("g5.xlarge", [], {"g5.xlarge": ["a"]}, spot=True, spot_fallback=False, avoid_zone="a")
    assert [(step.market, len(step.pools)) for step in launch_steps(spot_only, pools_of, avoid_zone="a")] == [("spot", 1)]
