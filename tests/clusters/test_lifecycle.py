"""up -> status -> down through gpuflow's functions and its CLI, against moto,
asserting what EC2 really holds afterwards."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat

import pytest

from gpuflow import clusters
from gpuflow.cli import main
from gpuflow.errors import ClusterNotFound, StateError, UsageError
from gpuflow.state import StateStore
from infra.aws.instance import client_token
from infra.sandbox import seed_deep_learning_ami
from infra.userdata import USER_DATA_MARKER
from tests.infra.cloud import (
    CALLER_CIDR,
    REGION,
    leftovers,
    make_spec,
)


def _instance(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def _launched_hours_ago(instance_id, hours):
    """Move the instance's LaunchTime back in moto's record (no clock is waited for)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_instance(instance_id).launch_time -= datetime.timedelta(hours=hours)


def _assert_hardened_instance(ec2, cluster, *, disk_gb):
    node = cluster.head
    instance = _instance(ec2, node.instance_id)
    assert instance["State"]["Name"] == "running"
    assert instance["InstanceType"] == cluster.instance_type
    assert instance["ImageId"] == cluster.ami
    metadata = instance["MetadataOptions"]
    assert metadata["HttpTokens"] == "required"
    assert metadata["HttpPutResponseHopLimit"] == 1
    shutdown = ec2.describe_instance_attribute(InstanceId=node.instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
    assert tags["gpuflow:cluster"] == cluster.name
    assert tags["gpuflow:managed"] == "true"
    assert "@" in tags["gpuflow:owner"]
    assert tags["gpuflow:created-at"] == cluster.created_at

    document = StateStore(os.environ["GPUFLOW_HOME"], "clusters").get(cluster.name)
    assert instance["ClientToken"] == client_token(cluster.name, document["launch_id"], 0)

    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [node.instance_id]}])["Volumes"]
    assert len(volumes) == 1
    volume = volumes[0]
    assert volume["Encrypted"] is True
    assert volume["VolumeType"] == "gp3"
    assert volume["Size"] == disk_gb
    assert {tag["Key"]: tag["Value"] for tag in volume["Tags"]}["gpuflow:cluster"] == cluster.name

    user_data = ec2.describe_instance_attribute(InstanceId=node.instance_id, Attribute="userData")["UserData"]["Value"]
    script = base64.b64decode(user_data).decode()
    assert USER_DATA_MARKER in script
    assert "gpuflow-deadman" in script
    assert "AWS_SECRET_ACCESS_KEY" not in script and "testing" not in script

    group = ec2.describe_security_groups(GroupIds=[cluster.security_group_id])["SecurityGroups"][0]
    assert [group_ref["GroupId"] for group_ref in instance["SecurityGroups"]] == [cluster.security_group_id]
    assert len(group["IpPermissions"]) == 1
    rule = group["IpPermissions"][0]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [ip_range["CidrIp"] for ip_range in rule["IpRanges"]] == [CALLER_CIDR]
    assert not rule.get("Ipv6Ranges")
    assert {tag["Key"]: tag["Value"] for tag in group["Tags"]}["gpuflow:cluster"] == cluster.name

    key_pair = ec2.describe_key_pairs(KeyNames=[cluster.key_name])["KeyPairs"][0]
    assert key_pair["KeyType"] == "ed25519"
    assert {tag["Key"]: tag["Value"] for tag in key_pair["Tags"]}["gpuflow:managed"] == "true"
    key_file = cluster.key_path
    assert key_file.endswith(f"keys/{cluster.name}.pem")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    with open(key_file) as handle:
        assert handle.read().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_lifecycle_through_functions(cloud, provisioners, gpuflow_home):
    steps = []
    cluster = clusters.up(make_spec("life", disk_gb=120), progress=steps.append, provisioner_factory=provisioners)
    assert any("running" in step for step in steps) and any("status checks ok" in step for step in steps)
    assert cluster.price_per_hour == pytest.approx(1.006)  # g5.xlarge in infra/prices.json
    _assert_hardened_instance(cloud, cluster, disk_gb=120)

    assert clusters.get_cluster("life") == cluster
    _launched_hours_ago(cluster.head.instance_id, 2)
    current = clusters.status("life", provisioner_factory=provisioners)
    assert current.state == "running"
    assert current.address == cluster.head.public_ip
    assert current.price_per_hour == pytest.approx(1.006)
    assert current.uptime_seconds >= 2 * 3600
    assert current.cost_so_far == pytest.approx(1.006 * current.uptime_seconds / 3600)  # price x uptime, >= $2.01
    assert [item.cluster.name for item in clusters.list_clusters(provisioner_factory=provisioners)] == ["life"]

    report = clusters.down("life", provisioner_factory=provisioners)
    assert report.terminated == (cluster.head.instance_id,)
    assert report.deleted_security_groups == (cluster.security_group_id,)
    assert report.deleted_key_pairs == (cluster.key_name,)
    assert report.estimated_cost is not None
    assert _instance(cloud, cluster.head.instance_id)["State"]["Name"] == "terminated"
    assert leftovers(cloud, gpuflow_home) == {}

    again = clusters.down("life", provisioner_factory=provisioners)
    assert again.already_down
    with pytest.raises(ClusterNotFound):
        clusters.get_cluster("life")
    with pytest.raises(ClusterNotFound):
        clusters.status("life", provisioner_factory=provisioners)


def test_lifecycle_through_cli(cloud, gpuflow_home, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "cli-one", "--region", REGION, "--ssh-cidr", CALLER_CIDR, "--disk-gb", "80", "--json"])
    assert exit_info.value.code == 0
    launched = json.loads(capsys.readouterr().out)
    instance_id = launched["nodes"][0]["instance_id"]
    cluster = clusters.get_cluster("cli-one")
    assert cluster.head.instance_id == instance_id
    _assert_hardened_instance(cloud, cluster, disk_gb=80)

    with pytest.raises(SystemExit) as exit_info:
        main(["status", "cli-one", "--json"])
    assert exit_info.value.code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "running" and shown["price_per_hour"] == pytest.approx(1.006)
    assert shown["address"] == cluster.head.public_ip

    with pytest.raises(SystemExit) as exit_info:
        main(["ls"])
    assert exit_info.value.code == 0
    table = capsys.readouterr().out
    assert "cli-one" in table and "running" in table and "$1.01" in table

    with pytest.raises(SystemExit) as exit_info:
        main(["down", "cli-one", "--yes"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "cluster cli-one is down: 1 instance(s) terminated" in out and "estimated cost $" in out
    assert leftovers(cloud, gpuflow_home) == {}

    with pytest.raises(SystemExit) as exit_info:
        main(["down", "cli-one", "--yes"])
    assert exit_info.value.code == 0
    assert "already down" in capsys.readouterr().out


def test_count_two_and_users_own_key_pair_is_kept(cloud, provisioners, gpuflow_home, tmp_path):
    material = cloud.create_key_pair(KeyName="my-key", KeyType="ed25519")["KeyMaterial"]
    key_file = tmp_path / "my-key.pem"
    key_file.write_text(material)
    key_file.chmod(0o600)  # as OpenSSH wants it: `up` refuses a key others can read
    spec = make_spec("pair", count=2, key_name="my-key", key_path=str(key_file))
    cluster = clusters.up(spec, provisioner_factory=provisioners)
    assert len(cluster.nodes) == 2 and not cluster.key_created
    assert all(_instance(cloud, node.instance_id)["KeyName"] == "my-key" for node in cluster.nodes)
    assert not (gpuflow_home / "keys" / "pair.pem").exists()

    report = clusters.down("pair", provisioner_factory=provisioners)
    assert sorted(report.terminated) == sorted(node.instance_id for node in cluster.nodes)
    assert report.deleted_key_pairs == ()
    assert cloud.describe_key_pairs(KeyNames=["my-key"])["KeyPairs"]  # never delete what the user brought
    assert key_file.exists()
    assert leftovers(cloud, gpuflow_home) == {}


def test_second_up_of_same_name_returns_the_live_cluster(cloud, provisioners, api_calls):
    first = clusters.up(make_spec("twice"), provisioner_factory=provisioners)
    second = clusters.up(make_spec("twice", instance_type="g5.2xlarge"), provisioner_factory=provisioners)
    assert second.head.instance_id == first.head.instance_id
    assert api_calls.count("RunInstances") == 1
    assert api_calls.count("CreateSecurityGroup") == 1
    tagged = cloud.describe_instances(Filters=[{"Name": "tag:gpuflow:cluster", "Values": ["twice"]}])["Reservations"]
    assert sum(len(reservation["Instances"]) for reservation in tagged) == 1


def test_up_refuses_a_name_whose_instances_run_elsewhere(cloud, provisioners, gpuflow_home):
    cluster = clusters.up(make_spec("elsewhere"), provisioner_factory=provisioners)
    (gpuflow_home / "state" / "clusters" / "elsewhere.json").unlink()  # another laptop launched it
    with pytest.raises(UsageError, match="already run"):
        clusters.up(make_spec("elsewhere"), provisioner_factory=provisioners)
    # down finds it by its tags alone
    report = clusters.down("elsewhere", region=REGION, provisioner_factory=provisioners)
    assert report.terminated == (cluster.head.instance_id,)
    assert cluster.security_group_id in report.deleted_security_groups
    assert leftovers(cloud, gpuflow_home) == {}


def test_status_reconciles_an_instance_terminated_outside_gpuflow(cloud, provisioners, gpuflow_home):
    cluster = clusters.up(make_spec("outside"), provisioner_factory=provisioners)
    cloud.terminate_instances(InstanceIds=[cluster.head.instance_id])
    current = clusters.status("outside", provisioner_factory=provisioners)
    assert current.state == "gone"
    assert current.cost_so_far == 0 and current.uptime_seconds == 0
    cached = StateStore(gpuflow_home, "clusters").get("outside")
    assert cached["nodes"][0]["state"] == "terminated"

    # The security group and key pair are orphans now: reap lists them, --yes removes them.
    dry = clusters.reap(provisioner_factory=provisioners)
    assert not dry.deleted
    assert {(item.kind, item.resource_id) for item in dry.items} == {
        ("security-group", cluster.security_group_id),
        ("key-pair", cluster.key_name),
    }
    assert all(item.cluster == "outside" and "@" in (item.owner or "") for item in dry.items)
    assert cloud.describe_security_groups(GroupIds=[cluster.security_group_id])["SecurityGroups"]
    done = clusters.reap(yes=True, provisioner_factory=provisioners)
    assert done.deleted
    assert leftovers(cloud, gpuflow_home) == {}
    assert clusters.down("outside", provisioner_factory=provisioners).already_down


def test_up_after_the_cluster_ended_replaces_it(cloud, provisioners, gpuflow_home):
    first = clusters.up(make_spec("reborn"), provisioner_factory=provisioners)
    cloud.terminate_instances(InstanceIds=[first.head.instance_id])  # the dead-man's switch fired
    second = clusters.up(make_spec("reborn"), provisioner_factory=provisioners)
    assert second.head.instance_id != first.head.instance_id
    assert not cloud.describe_security_groups(Filters=[{"Name": "group-id", "Values": [first.security_group_id]}])["SecurityGroups"]
    clusters.down("reborn", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def _tagged_instance(cloud, image: str, cluster: str, owner_id: str | None) -> str:
    """An instance another gpuflow run left behind: tagged for ``cluster``, unknown to this state."""
    tags = [{"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": cluster}]
    if owner_id is not None:
        tags.append({"Key": "gpuflow:owner-id", "Value": owner_id})
    return cloud.run_instances(
        ImageId=image, InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]


def test_ls_and_reap_show_instances_unknown_locally(cloud, provisioners, gpuflow_home, capsys):
    known = clusters.up(make_spec("known"), provisioner_factory=provisioners)
    # One of ours whose local record is gone, one a colleague's running cluster, one untagged by owner id.
    ghost = _tagged_instance(cloud, known.ami, "ghost", clusters.owner_id())
    colleague = _tagged_instance(cloud, known.ami, "their-run", "gf-colleague")
    unowned = _tagged_instance(cloud, known.ami, "old-run", None)
    listed = {item.cluster.name: item for item in clusters.list_clusters(provisioner_factory=provisioners)}
    assert listed["known"].state == "running" and listed["known"].known_locally
    assert listed["ghost"].state == "unmanaged" and not listed["ghost"].known_locally
    assert listed["ghost"].price_per_hour == pytest.approx(1.006)

    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--json"])
    assert exit_info.value.code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["deleted"] is False
    assert [(item["kind"], item["resource_id"]) for item in plan["items"]] == [("instance", ghost)]
    assert sorted(item["resource_id"] for item in plan["skipped_other_owners"]) == sorted([colleague, unowned])

    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--yes"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert f"deleted instance {ghost}" in captured.out
    assert "left alone: 2 item(s) other gpuflow installs created" in captured.err and "--any-owner" in captured.err
    assert _instance(cloud, ghost)["State"]["Name"] == "terminated"
    assert _instance(cloud, colleague)["State"]["Name"] == "running"  # a shared account: not ours to reap
    assert _instance(cloud, unowned)["State"]["Name"] == "running"
    assert _instance(cloud, known.head.instance_id)["State"]["Name"] == "running"  # owned by a live cluster

    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--yes", "--any-owner", "--json"])
    assert exit_info.value.code == 0
    assert _instance(cloud, colleague)["State"]["Name"] == "terminated"
    assert _instance(cloud, unowned)["State"]["Name"] == "terminated"
    assert _instance(cloud, known.head.instance_id)["State"]["Name"] == "running"
    clusters.down("known", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_the_owner_id_is_made_once_per_home_and_can_be_set_for_ci(gpuflow_home, monkeypatch, capsys):
    monkeypatch.delenv("GPUFLOW_OWNER_ID", raising=False)
    first = clusters.owner_id()
    assert first.startswith("gf-") and clusters.owner_id() == first
    assert (gpuflow_home / "owner-id").read_text().strip() == first
    monkeypatch.setenv("GPUFLOW_OWNER_ID", "ci-myproject")
    assert clusters.owner_id() == "ci-myproject"
    monkeypatch.setenv("GPUFLOW_OWNER_ID", "bad id; rm -rf /")
    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--sandbox"])
    assert exit_info.value.code == 2
    assert "invalid GPUFLOW_OWNER_ID" in capsys.readouterr().err
    monkeypatch.delenv("GPUFLOW_OWNER_ID")
    (gpuflow_home / "owner-id").write_text("not valid!\n")
    with pytest.raises(StateError, match="owner-id is damaged"):
        clusters.owner_id()


def test_down_all_needs_yes_without_a_terminal(cloud, provisioners, gpuflow_home, capsys, monkeypatch):
    clusters.up(make_spec("a1"), provisioner_factory=provisioners)
    clusters.up(make_spec("a2"), provisioner_factory=provisioners)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["down", "--all"])
    assert exit_info.value.code == 2
    assert "needs --yes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["down", "--all", "--yes", "--json"])
    assert exit_info.value.code == 0
    reports = json.loads(capsys.readouterr().out)
    assert sorted(report["name"] for report in reports) == ["a1", "a2"]
    assert leftovers(cloud, gpuflow_home) == {}


def test_instance_state_and_console_output_for_the_ssh_layer(cloud, provisioners):
    cluster = clusters.up(make_spec("probe"), provisioner_factory=provisioners)
    instance_id = cluster.head.instance_id
    assert clusters.instance_state(cluster, instance_id, provisioner_factory=provisioners) == "running"
    assert isinstance(clusters.console_output(cluster, instance_id, provisioner_factory=provisioners), str)
    clusters.down("probe", provisioner_factory=provisioners)
    assert clusters.instance_state(cluster, instance_id, provisioner_factory=provisioners) == "terminated"
    assert clusters.instance_state(cluster, "i-0123456789abcdef0", provisioner_factory=provisioners) == "not-found"


def test_reap_removes_stray_volumes_and_spot_requests(cloud, provisioners, gpuflow_home):
    tags = [{"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": "crashed-long-ago"},
            {"Key": "gpuflow:owner-id", "Value": clusters.owner_id()}]
    volume_id = cloud.create_volume(
        AvailabilityZone="us-east-1a", Size=100, VolumeType="gp3", Encrypted=True,
        TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
    )["VolumeId"]
    unrelated = cloud.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    image = seed_deep_learning_ami(REGION)  # idempotent: the AMI the fixture seeded
    request_id = cloud.request_spot_instances(
        InstanceCount=1, LaunchSpecification={"ImageId": image, "InstanceType": "g5.xlarge"},
        TagSpecifications=[{"ResourceType": "spot-instances-request", "Tags": tags}],
    )["SpotInstanceRequests"][0]["SpotInstanceRequestId"]

    plan = clusters.reap(provisioner_factory=provisioners)
    kinds = {(item.kind, item.resource_id) for item in plan.items}
    assert ("volume", volume_id) in kinds and ("spot-request", request_id) in kinds
    assert all(item.cluster == "crashed-long-ago" for item in plan.items if item.kind in ("volume", "spot-request"))
    assert unrelated not in {item.resource_id for item in plan.items}  # never touch what gpuflow did not tag

    clusters.reap(yes=True, provisioner_factory=provisioners)
    assert not cloud.describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])["Volumes"]
    assert cloud.describe_volumes(VolumeIds=[unrelated])["Volumes"]
    requests = cloud.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])["SpotInstanceRequests"]
    assert [request["State"] for request in requests] in ([], ["cancelled"])  # moto forgets cancelled requests
    assert leftovers(cloud, gpuflow_home) == {}


def test_down_waits_out_a_security_group_still_in_use(cloud, provisioners, api_calls, gpuflow_home):
    cluster = clusters.up(make_spec("busy-group"), provisioner_factory=provisioners)
    api_calls.fail("DeleteSecurityGroup", code="DependencyViolation", times=2)  # ENIs still detaching
    report = clusters.down("busy-group", provisioner_factory=provisioners)
    assert report.deleted_security_groups == (cluster.security_group_id,)
    assert api_calls.count("DeleteSecurityGroup") == 3
    assert provisioners.sleeps == [provisioners.poll_seconds] * 2
    assert leftovers(cloud, gpuflow_home) == {}


def test_down_after_down_cleans_what_reappeared_under_the_name(cloud, provisioners, gpuflow_home):
    first = clusters.up(make_spec("again"), provisioner_factory=provisioners)
    clusters.down("again", provisioner_factory=provisioners)
    # this gpuflow (another laptop with the same owner id) launched a cluster of that name meanwhile;
    # another owner's is left alone (tests/clusters/test_ownership.py)
    stray = cloud.run_instances(
        ImageId=first.ami, InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": "again"},
            {"Key": "gpuflow:owner-id", "Value": clusters.owner_id()}]}],
    )["Instances"][0]["InstanceId"]
    report = clusters.down("again", provisioner_factory=provisioners)
    assert report.terminated == (stray,) and not report.already_down
    assert leftovers(cloud, gpuflow_home) == {}


def test_a_record_written_before_phases_counts_as_up(cloud, provisioners, gpuflow_home):
    """A record without a `phase` (written before phases existed) reads as `up`
    everywhere: reap leaves its live cluster alone, status reconciles it, down
    tombstones it, and the JSON keeps its format (`"phase": "deleted"`)."""
    cluster = clusters.up(make_spec("old"), provisioner_factory=provisioners)
    store = StateStore(gpuflow_home, "clusters")
    document = store.get("old")
    del document["phase"]
    store.put("old", document)
    plan = clusters.reap(provisioner_factory=provisioners)
    assert [(item.kind, item.resource_id) for item in plan.items if item.cluster == "old"] == []
    assert clusters.status("old", provisioner_factory=provisioners).state == "running"
    assert clusters.get_cluster("old").head.instance_id == cluster.head.instance_id
    report = clusters.down("old", provisioner_factory=provisioners)
    assert report.terminated == (cluster.head.instance_id,)
    assert json.loads((gpuflow_home / "state" / "clusters" / "old.json").read_text())["phase"] == "deleted"
    assert leftovers(cloud, gpuflow_home) == {}
