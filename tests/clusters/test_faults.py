"""Failures during `up`: every AWS call it makes is made to fail in turn, and
nothing gpuflow created may remain; capacity, spot and throttling fallbacks."""

from __future__ import annotations

import subprocess

import pytest

from gpuflow import clusters
from gpuflow.clusters import launch
from gpuflow.cli import main
from gpuflow.errors import CapacityError, CloudError, GpuflowError, UsageError
from gpuflow.state import StateStore
from tests.infra.cloud import (
    REGION,
    leftovers,
    make_spec,
)

# The AWS calls of one successful `up` (1 on-demand instance, new key pair, --ssh-cidr given), in order.
UP_CALLS = [
    "DescribeInstanceTypes",
    "DescribeInstanceTypeOfferings",
    "GetParametersByPath",
    "DescribeImages",
    "DescribeStacks",  # the account stack of durable runs (its instance profile), if `gpuflow setup` made one
    "DescribeInstances",  # is a cluster of that name running already?
    "CreateKeyPair",
    "DescribeVpcs",
    "CreateSecurityGroup",
    "AuthorizeSecurityGroupIngress",
    "DescribeSubnets",
    "RunInstances",
    "DescribeInstances",  # wait: running
    "DescribeInstances",  # wait: status ok
    "DescribeInstanceStatus",
]


def test_up_makes_exactly_these_calls(cloud, provisioners, api_calls):
    clusters.up(make_spec("calls"), provisioner_factory=provisioners)
    assert api_calls.calls == UP_CALLS


@pytest.mark.parametrize(
    "position", range(len(UP_CALLS)), ids=[f"{index:02d}-{name}" for index, name in enumerate(UP_CALLS)]
)
def test_each_failing_call_leaves_nothing(cloud, provisioners, api_calls, gpuflow_home, position):
    operation = UP_CALLS[position]
    api_calls.fail(operation, nth=UP_CALLS[:position].count(operation))
    with pytest.raises(CloudError, match="InjectedFailure"):
        clusters.up(make_spec("faulty"), provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}
    # and the name is free again: the next up works
    assert clusters.up(make_spec("faulty"), provisioner_factory=provisioners).head.state == "running"


@pytest.mark.parametrize("operation", sorted(set(UP_CALLS)))
def test_each_operation_failing_every_time_leaves_nothing(cloud, provisioners, api_calls, gpuflow_home, operation):
    api_calls.fail(operation)
    with pytest.raises(CloudError, match="InjectedFailure"):
        clusters.up(make_spec("always"), provisioner_factory=provisioners)
    api_calls.faults.clear()
    assert leftovers(cloud, gpuflow_home) == {}


def test_ctrl_c_while_waiting_removes_everything(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("DescribeInstanceStatus", exception=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        clusters.up(make_spec("interrupted"), provisioner_factory=provisioners)
    assert api_calls.count("TerminateInstances") == 1
    assert leftovers(cloud, gpuflow_home) == {}


def test_ctrl_c_in_the_cli_exits_130_and_cleans_up(cloud, api_calls, gpuflow_home, capsys):
    api_calls.fail("DescribeInstanceStatus", exception=KeyboardInterrupt())
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "cli-interrupted", "--region", REGION, "--ssh-cidr", "203.0.113.7/32"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "gpuflow: error: interrupted"
    assert leftovers(cloud, gpuflow_home) == {}


def test_lost_run_instances_answer_is_found_by_its_launch_tag(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("RunInstances", code="RequestTimeout", lose_response=True, times=1)
    api_calls.fail("RunInstances", nth=1)  # the retry (same ClientToken) fails hard
    with pytest.raises(CloudError):
        clusters.up(make_spec("lost"), provisioner_factory=provisioners)
    tokens = {params["ClientToken"] for name, params in zip(api_calls.calls, api_calls.params) if name == "RunInstances"}
    assert len(tokens) == 1  # a retried launch reuses its idempotency token
    assert leftovers(cloud, gpuflow_home) == {}  # the instance launched by the lost call was terminated too


def test_crashed_up_is_finished_by_down(cloud, provisioners, api_calls, gpuflow_home, monkeypatch):
    api_calls.fail("DescribeInstanceStatus")
    with monkeypatch.context() as patch:
        patch.setattr(launch, "_rollback", lambda *args, **kwargs: None)  # as if the process was killed
        with pytest.raises(CloudError):
            clusters.up(make_spec("crashed"), provisioner_factory=provisioners)
    api_calls.faults.clear()
    left = leftovers(cloud, gpuflow_home)
    assert set(left) >= {"instances", "security_groups", "key_pairs", "state", "key_files"}
    store = StateStore(gpuflow_home, "clusters")
    with pytest.raises(UsageError, match="being created by another gpuflow process"):
        clusters.up(make_spec("crashed"), provisioner_factory=provisioners)  # this very process "holds" it
    document = store.get("crashed")
    document["pid"] = _dead_pid()
    store.put("crashed", document)
    with pytest.raises(UsageError, match="interrupted"):
        clusters.up(make_spec("crashed"), provisioner_factory=provisioners)
    assert clusters.status("crashed", provisioner_factory=provisioners).state == "interrupted"
    report = clusters.down("crashed", provisioner_factory=provisioners)
    assert report.terminated == tuple(left["instances"])
    assert leftovers(cloud, gpuflow_home) == {}
    assert clusters.down("crashed", provisioner_factory=provisioners).already_down


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------- capacity and spot
def _is_spot(params):
    return "InstanceMarketOptions" in params


def test_capacity_error_moves_to_the_next_zone(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("RunInstances", code="InsufficientInstanceCapacity", nth=0)
    warnings = []
    cluster = clusters.up(make_spec("zones"), provisioner_factory=provisioners, warn=warnings.append)
    zones = clusters_zones(cloud)
    assert cluster.head.availability_zone == zones[1]
    run_params = [params for name, params in zip(api_calls.calls, api_calls.params) if name == "RunInstances"]
    assert len(run_params) == 2
    assert run_params[0]["SubnetId"] != run_params[1]["SubnetId"]
    assert run_params[0]["ClientToken"] != run_params[1]["ClientToken"]
    assert any("InsufficientInstanceCapacity" in warning for warning in warnings)
    clusters.down("zones", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def clusters_zones(ec2):
    offerings = ec2.describe_instance_type_offerings(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": ["g5.xlarge"]}]
    )["InstanceTypeOfferings"]
    return sorted(offering["Location"] for offering in offerings)


def test_no_capacity_anywhere_fails_cleanly(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("RunInstances", code="InsufficientInstanceCapacity")
    with pytest.raises(CapacityError, match="no capacity"):
        clusters.up(make_spec("full"), provisioner_factory=provisioners)
    assert api_calls.count("RunInstances") == len(clusters_zones(cloud))
    assert leftovers(cloud, gpuflow_home) == {}


def test_spot_launch_is_priced_from_the_spot_history(cloud, provisioners, api_calls):
    cluster = clusters.up(make_spec("spotty", spot=True), provisioner_factory=provisioners)
    instance = cloud.describe_instances(InstanceIds=[cluster.head.instance_id])["Reservations"][0]["Instances"][0]
    assert instance["InstanceLifecycle"] == "spot"
    assert cluster.head.lifecycle == "spot"
    run = next(params for name, params in zip(api_calls.calls, api_calls.params) if name == "RunInstances")
    assert run["InstanceMarketOptions"]["SpotOptions"]["InstanceInterruptionBehavior"] == "terminate"
    history = cloud.describe_spot_price_history(
        InstanceTypes=["g5.xlarge"], AvailabilityZone=cluster.head.availability_zone
    )["SpotPriceHistory"]
    zone_prices = {float(entry["SpotPrice"]) for entry in history if entry["AvailabilityZone"] == cluster.head.availability_zone}
    assert cluster.price_per_hour in zone_prices
    assert "DescribeSpotPriceHistory" in api_calls.calls


def test_spot_without_capacity_falls_back_to_on_demand(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("RunInstances", code="InsufficientInstanceCapacity", when=_is_spot)
    warnings = []
    cluster = clusters.up(
        make_spec("fallback", spot=True, spot_fallback=True), provisioner_factory=provisioners, warn=warnings.append
    )
    instance = cloud.describe_instances(InstanceIds=[cluster.head.instance_id])["Reservations"][0]["Instances"][0]
    assert "InstanceLifecycle" not in instance
    assert cluster.price_per_hour == pytest.approx(1.006)
    assert any("on-demand instead" in warning for warning in warnings)
    assert api_calls.count("RunInstances") == len(clusters_zones(cloud)) + 1
    clusters.down("fallback", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_spot_without_capacity_and_without_fallback_fails_cleanly(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("RunInstances", code="InsufficientInstanceCapacity", when=_is_spot)
    with pytest.raises(CapacityError) as error:
        clusters.up(make_spec("nofallback", spot=True), provisioner_factory=provisioners)
    assert "--spot-fallback" in error.value.one_line()
    assert leftovers(cloud, gpuflow_home) == {}


# ---------------------------------------------------------------- throttling
def test_throttled_calls_are_retried_with_backoff(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("CreateSecurityGroup", code="RequestLimitExceeded", times=2)
    api_calls.fail("RunInstances", code="RequestLimitExceeded", times=1)
    cluster = clusters.up(make_spec("throttled"), provisioner_factory=provisioners)
    assert cluster.head.state == "running"
    assert api_calls.count("CreateSecurityGroup") == 3
    assert len(provisioners.sleeps) == 3
    assert all(0 <= delay <= 20 for delay in provisioners.sleeps)
    run_tokens = {params["ClientToken"] for name, params in zip(api_calls.calls, api_calls.params) if name == "RunInstances"}
    assert len(run_tokens) == 1  # the retry is the same launch, not a second one
    tagged = cloud.describe_instances(Filters=[{"Name": "tag:gpuflow:cluster", "Values": ["throttled"]}])["Reservations"]
    assert sum(len(reservation["Instances"]) for reservation in tagged) == 1


def test_endless_throttling_gives_up_and_cleans_up(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("DescribeSubnets", code="RequestLimitExceeded")
    with pytest.raises(CloudError, match="RequestLimitExceeded"):
        clusters.up(make_spec("throttled-out"), provisioner_factory=provisioners)
    assert api_calls.count("DescribeSubnets") == 6
    assert len(provisioners.sleeps) == 5
    api_calls.faults.clear()
    assert leftovers(cloud, gpuflow_home) == {}


def test_server_errors_are_gpuflow_errors_not_tracebacks(cloud, provisioners, api_calls):
    api_calls.fail("DescribeInstanceTypes", code="InternalError")
    with pytest.raises(GpuflowError) as error:
        clusters.up(make_spec("five-hundred"), provisioner_factory=provisioners)
    assert "InternalError" in error.value.one_line()
    assert api_calls.count("DescribeInstanceTypes") == 6


def test_cli_spot_fallback_flag(cloud, api_calls, gpuflow_home, capsys):
    api_calls.fail("RunInstances", code="InsufficientInstanceCapacity", when=_is_spot)
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "cli-spot", "--spot", "--spot-fallback", "--ssh-cidr", "203.0.113.7/32"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "(on-demand)" in captured.out
    assert "gpuflow: warning: no spot capacity: launched on-demand instead" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "cli-spot-strict", "--spot", "--ssh-cidr", "203.0.113.7/32"])
    assert exit_info.value.code == 5
    assert "no capacity" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["down", "cli-spot", "--yes"])
    api_calls.faults.clear()
    assert leftovers(cloud, gpuflow_home) == {}


# ---------------------------------------------------------------- the spot service-linked role
def _delete_spot_role() -> None:
    import boto3

    boto3.client("iam", region_name=REGION).delete_role(RoleName="AWSServiceRoleForEC2Spot")


@pytest.mark.parametrize("fallback", [False, True])
def test_spot_without_the_service_linked_role_is_refused_before_anything_is_created(
    cloud, provisioners, api_calls, gpuflow_home, fallback
):
    """Through the API, AWS does not create AWSServiceRoleForEC2Spot by itself:
    `up --spot` says how to create it, and creates nothing."""
    _delete_spot_role()
    with pytest.raises(CloudError) as error:
        clusters.up(make_spec("no-role", spot=True, spot_fallback=fallback), provisioner_factory=provisioners)
    line = error.value.one_line()
    assert "AWSServiceRoleForEC2Spot" in line
    assert "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com" in line
    assert "\n" not in line
    assert api_calls.count("GetRole") == 1
    for creating in ("CreateKeyPair", "CreateSecurityGroup", "RunInstances"):
        assert api_calls.count(creating) == 0
    assert leftovers(cloud, gpuflow_home) == {}


def test_a_denied_role_check_does_not_block_the_spot_launch(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("GetRole", code="AccessDenied")
    warnings: list[str] = []
    cluster = clusters.up(make_spec("denied", spot=True), provisioner_factory=provisioners, warn=warnings.append)
    assert cluster.head.lifecycle == "spot"
    assert any("could not check" in warning and "create-service-linked-role" in warning for warning in warnings)
    clusters.down("denied", provisioner_factory=provisioners)


def test_on_demand_launches_do_not_ask_iam(cloud, provisioners, api_calls):
    _delete_spot_role()
    clusters.up(make_spec("on-demand"), provisioner_factory=provisioners)
    assert api_calls.count("GetRole") == 0


def test_cli_spot_without_the_role_is_one_line_and_exit_5(cloud, api_calls, gpuflow_home, capsys):
    _delete_spot_role()
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "cli-no-role", "--spot", "--ssh-cidr", "203.0.113.7/32"])
    assert exit_info.value.code == 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpuflow: error: --spot needs the account's AWSServiceRoleForEC2Spot")
    assert "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com" in err
    assert leftovers(cloud, gpuflow_home) == {}
