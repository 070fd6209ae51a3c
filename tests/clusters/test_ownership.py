"""A command touches only what this gpuflow created: owner-scoped down/status/up/reap,
a recorded cluster looked for where it was recorded, and the CI story (an owner id per
job, a pipeline-level reap of finished jobs and of what is past its --max-hours)."""

from __future__ import annotations

import datetime
import io
import json

import pytest

from gpuflow import clusters, jobs
from gpuflow.cli import main
from gpuflow.errors import ClusterNotFound, UsageError
from gpuflow.state import StateStore
from infra.sandbox import seed_deep_learning_ami
from tests.infra.cloud import REGION, leftovers, make_spec

OTHER_REGION = "eu-west-1"


def _state(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


def _as(monkeypatch, home) -> str:
    """Act as the gpuflow whose home is ``home`` (another person on the same account)."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("GPUFLOW_HOME", str(home))
    monkeypatch.delenv("GPUFLOW_OWNER_ID", raising=False)
    return clusters.owner_id()


def _exists(ec2, cluster) -> dict[str, bool]:
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-id", "Values": [cluster.security_group_id]}])
    keys = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [cluster.key_name]}])
    return {
        "instance": _state(ec2, cluster.head.instance_id) == "running",
        "security_group": bool(groups["SecurityGroups"]),
        "key_pair": bool(keys["KeyPairs"]),
    }


ALIVE = {"instance": True, "security_group": True, "key_pair": True}


# ----------------------------------------------------------------------------- item 1: where it was recorded
def test_a_retyped_up_in_another_region_never_tears_down_the_live_cluster(cloud, provisioners, gpuflow_home, capsys):
    seed_deep_learning_ami(OTHER_REGION)
    import boto3

    eu = boto3.client("ec2", region_name=OTHER_REGION)
    first = clusters.up(make_spec("r2", region=OTHER_REGION), provisioner_factory=provisioners)
    with pytest.raises(UsageError, match=f"already up in {OTHER_REGION}") as refused:
        clusters.up(make_spec("r2"), provisioner_factory=provisioners)  # --region forgotten
    assert "down" not in refused.value.message
    assert _exists(eu, first) == ALIVE
    assert "instances" not in leftovers(cloud, gpuflow_home)  # nothing launched in us-east-1 either
    document = StateStore(gpuflow_home, "clusters").get("r2")
    assert document["region"] == OTHER_REGION and document["phase"] == "up"

    # the CLI says so in one line, exit 2, and the cluster still runs
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "r2", "--region", REGION, "--ssh-cidr", "203.0.113.7/32"])
    assert exit_info.value.code == 2
    assert f"already up in {OTHER_REGION}" in capsys.readouterr().err
    assert _exists(eu, first) == ALIVE

    # typed the same way again, it is the same cluster
    again = clusters.up(make_spec("r2", region=OTHER_REGION), provisioner_factory=provisioners)
    assert again.head.instance_id == first.head.instance_id


def test_up_elsewhere_after_the_recorded_cluster_ended_cleans_where_it_was_and_says_so(cloud, provisioners, gpuflow_home):
    seed_deep_learning_ami(OTHER_REGION)
    import boto3

    eu = boto3.client("ec2", region_name=OTHER_REGION)
    first = clusters.up(make_spec("moved", region=OTHER_REGION), provisioner_factory=provisioners)
    eu.terminate_instances(InstanceIds=[first.head.instance_id])  # the dead-man's switch fired
    warnings: list[str] = []
    second = clusters.up(make_spec("moved"), provisioner_factory=provisioners, warn=warnings.append)
    assert second.region == REGION
    assert not any(_exists(eu, first).values())  # its group and key pair were removed in eu-west-1
    assert any("ended" in line and OTHER_REGION in line for line in warnings)  # said without a terminal too
    clusters.down("moved", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {} and leftovers(eu, gpuflow_home) == {}


# ----------------------------------------------------------------------------- item 2: two owners, one account
@pytest.fixture
def alice_and_bob(cloud, provisioners, tmp_path, monkeypatch):
    alice_id = _as(monkeypatch, tmp_path / "alice")
    alice = clusters.up(make_spec("ml"), provisioner_factory=provisioners)
    bob_id = _as(monkeypatch, tmp_path / "bob")
    assert alice_id != bob_id
    return alice, alice_id


def test_bobs_up_of_alices_name_is_refused_without_pointing_at_down(cloud, provisioners, alice_and_bob):
    alice, alice_id = alice_and_bob
    with pytest.raises(UsageError) as refused:
        clusters.up(make_spec("ml"), provisioner_factory=provisioners)
    text = refused.value.one_line()
    assert "another gpuflow" in text and alice_id in text
    assert "gpuflow down" not in text and "reap" not in text
    assert _exists(cloud, alice) == ALIVE


def test_bobs_down_without_a_record_leaves_alices_cluster_alone(cloud, provisioners, alice_and_bob, capsys, monkeypatch):
    alice, alice_id = alice_and_bob
    with pytest.raises(ClusterNotFound) as refused:
        clusters.down("ml", provisioner_factory=provisioners)
    assert "another gpuflow" in refused.value.message and alice_id in refused.value.message
    assert "--any-owner" in refused.value.hint
    assert _exists(cloud, alice) == ALIVE

    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["down", "ml", "--yes"])
    assert exit_info.value.code == 4
    err = capsys.readouterr().err
    assert "another gpuflow" in err and "--any-owner" in err
    assert _exists(cloud, alice) == ALIVE

    # status says whose it is, and shows it only when asked
    with pytest.raises(ClusterNotFound, match="another gpuflow"):
        clusters.status("ml", provisioner_factory=provisioners)
    shown = clusters.status("ml", any_owner=True, provisioner_factory=provisioners)
    assert shown.state == "unmanaged" and not shown.known_locally
    assert [node.instance_id for node in shown.cluster.nodes] == [alice.head.instance_id]

    # only an explicit --any-owner takes it
    with pytest.raises(SystemExit) as exit_info:
        main(["down", "ml", "--yes", "--any-owner"])
    assert exit_info.value.code == 0
    assert not any(_exists(cloud, alice).values())


def test_bobs_ssh_and_run_say_whose_the_name_is(cloud, alice_and_bob, tmp_path, capsys, monkeypatch):
    alice, alice_id = alice_and_bob
    monkeypatch.chdir(tmp_path)
    for command in (["ssh", "ml", "--", "true"], ["run", "ml", "--", "true"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 4
        err = capsys.readouterr().err
        assert "another gpuflow" in err and alice_id in err, command
        assert err.count("\n") == 1
    assert _exists(cloud, alice) == ALIVE


def test_down_of_a_recorded_name_takes_only_its_own_of_a_shared_name(cloud, provisioners, tmp_path, monkeypatch):
    bob_id = _as(monkeypatch, tmp_path / "bob")
    bobs = clusters.up(make_spec("ml"), provisioner_factory=provisioners)
    cloud.terminate_instances(InstanceIds=[bobs.head.instance_id])  # Bob's cluster ended by itself
    _as(monkeypatch, tmp_path / "alice")
    alices = clusters.up(make_spec("ml"), provisioner_factory=provisioners)  # the name is free in the account
    assert _as(monkeypatch, tmp_path / "bob") == bob_id

    with pytest.raises(UsageError, match="another gpuflow"):  # Bob retypes `up ml`: refused, nothing torn down
        clusters.up(make_spec("ml"), provisioner_factory=provisioners)
    # Bob's reap sees his own leftovers of `ml` (Alice's live `ml` does not make them live) and only those
    plan = clusters.reap(provisioner_factory=provisioners)
    assert {item.resource_id for item in plan.items} == {bobs.security_group_id, bobs.key_name}
    assert {item.resource_id for item in plan.skipped} == {alices.head.instance_id, alices.security_group_id, alices.key_name}
    [report] = clusters.down_all(provisioner_factory=provisioners)  # `down --all`: the same scoping
    assert report.deleted_security_groups == (bobs.security_group_id,)
    assert report.deleted_key_pairs == (bobs.key_name,)
    assert report.terminated == ()
    assert {item.resource_id for item in report.skipped} == {
        alices.head.instance_id, alices.security_group_id, alices.key_name,
    }
    assert _exists(cloud, alices) == ALIVE
    # a second down (tombstone) still leaves hers alone
    again = clusters.down("ml", provisioner_factory=provisioners)
    assert again.already_down and again.skipped
    assert _exists(cloud, alices) == ALIVE


def test_down_of_a_tombstone_cleans_only_its_own_reappeared_resources(cloud, provisioners, gpuflow_home):
    first = clusters.up(make_spec("again"), provisioner_factory=provisioners)
    clusters.down("again", provisioner_factory=provisioners)

    def launch(owner: str) -> str:
        return cloud.run_instances(
            ImageId=first.ami, InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": "again"},
                {"Key": "gpuflow:owner-id", "Value": owner}]}],
        )["Instances"][0]["InstanceId"]

    theirs = launch("gf-colleague")
    report = clusters.down("again", provisioner_factory=provisioners)
    assert report.already_down and [item.resource_id for item in report.skipped] == [theirs]
    assert _state(cloud, theirs) == "running"
    mine = launch(clusters.owner_id())  # this gpuflow, another machine (a shared GPUFLOW_OWNER_ID)
    report = clusters.down("again", provisioner_factory=provisioners)
    assert report.terminated == (mine,) and not report.already_down
    assert _state(cloud, theirs) == "running"
    cloud.terminate_instances(InstanceIds=[theirs])
    assert leftovers(cloud, gpuflow_home) == {}


def test_run_up_down_never_tears_down_another_owners_cluster(cloud, alice_and_bob, tmp_path):
    alice, _ = alice_and_bob
    said: list[str] = []
    with pytest.raises(UsageError) as refused:
        jobs.run_on_cluster(
            "ml", project_dir=tmp_path, module=None, args=["true"], out=io.BytesIO(),
            up_spec=make_spec("ml"), down=True, say=said.append,
        )
    assert _exists(cloud, alice) == ALIVE  # --down had nothing of ours to tear down
    assert "another gpuflow" in refused.value.message
    assert not any("tearing down" in line for line in said)


# ----------------------------------------------------------------------------- item 3: CI
def _ci_job(monkeypatch, tmp_path, job: str) -> str:
    """A CI job on a fresh runner: its own empty home, its owner id from the run id."""
    home = tmp_path / job
    home.mkdir()
    monkeypatch.setenv("GPUFLOW_HOME", str(home))
    monkeypatch.setenv("GPUFLOW_OWNER_ID", f"ci-4711-1-{job}")
    return f"ci-4711-1-{job}"


def test_concurrent_ci_jobs_never_reap_each_other_and_the_pipeline_reaps_finished_ones(cloud, provisioners, tmp_path, monkeypatch):
    _ci_job(monkeypatch, tmp_path, "train-a")
    job_a = clusters.up(make_spec("ci"), provisioner_factory=provisioners)
    _ci_job(monkeypatch, tmp_path, "train-b")
    job_b = clusters.up(make_spec("ci-b"), provisioner_factory=provisioners)
    # job B ends (its cluster gone) and reaps while job A still runs
    clusters.down("ci-b", provisioner_factory=provisioners)
    done = clusters.reap(yes=True, provisioner_factory=provisioners)
    assert done.items == () and {item.resource_id for item in done.skipped} >= {job_a.head.instance_id}
    assert _exists(cloud, job_a) == ALIVE

    # job A's runner dies: its cluster is left behind. The pipeline's last job (after every
    # job of run 4711 finished) reaps what the run's jobs left, and nothing of another run.
    _ci_job(monkeypatch, tmp_path, "train-c-other-run")
    monkeypatch.setenv("GPUFLOW_OWNER_ID", "ci-4712-1-train")
    other_run = clusters.up(make_spec("ci-next"), provisioner_factory=provisioners)
    monkeypatch.setenv("GPUFLOW_HOME", str(tmp_path / "final"))
    monkeypatch.delenv("GPUFLOW_OWNER_ID")
    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--yes", "--any-owner", "--owner-prefix", "ci-4711-", "--json"])
    assert exit_info.value.code == 0
    assert not any(_exists(cloud, job_a).values())
    assert _exists(cloud, other_run) == ALIVE
    del job_b


def test_a_scheduled_reap_takes_only_what_is_past_its_max_hours(cloud, provisioners, tmp_path, monkeypatch, capsys):
    _ci_job(monkeypatch, tmp_path, "fresh")
    fresh = clusters.up(make_spec("fresh", max_hours=2.0), provisioner_factory=provisioners)
    instance = cloud.describe_instances(InstanceIds=[fresh.head.instance_id])["Reservations"][0]["Instances"][0]
    tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
    expires = datetime.datetime.fromisoformat(tags["gpuflow:expires-at"])
    created = datetime.datetime.fromisoformat(tags["gpuflow:created-at"])
    assert expires - created == datetime.timedelta(hours=2)
    # a job of a run cancelled long ago: its expiry (created-at + --max-hours) has passed
    stale = cloud.run_instances(
        ImageId=fresh.ami, InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": "stale"},
            {"Key": "gpuflow:owner-id", "Value": "ci-4000-1-train"},
            {"Key": "gpuflow:expires-at", "Value": "2020-01-01T00:00:00+00:00"}]}],
    )["Instances"][0]["InstanceId"]
    # one whose --max-hours ended minutes ago: its switch (counting from boot) may not have fired yet
    just_now = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=10)).isoformat(timespec="seconds")
    recent = cloud.run_instances(
        ImageId=fresh.ami, InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": "recent"},
            {"Key": "gpuflow:owner-id", "Value": "ci-4001-1-train"},
            {"Key": "gpuflow:expires-at", "Value": just_now}]}],
    )["Instances"][0]["InstanceId"]
    monkeypatch.setenv("GPUFLOW_HOME", str(tmp_path / "nightly"))
    monkeypatch.delenv("GPUFLOW_OWNER_ID")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--yes", "--any-owner", "--owner-prefix", "ci-", "--expired", "--json"])
    assert exit_info.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert [item["resource_id"] for item in result["items"]] == [stale]
    assert _state(cloud, stale) == "terminated"
    assert _exists(cloud, fresh) == ALIVE  # job still within its --max-hours: maybe running
    assert _state(cloud, recent) == "running"
    assert recent in {item["resource_id"] for item in result["left_unexpired"]}


def test_owner_prefix_is_validated_and_needs_any_owner(gpuflow_home, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--sandbox", "--any-owner", "--owner-prefix", ""])
    assert exit_info.value.code == 2
    assert "owner prefix" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["reap", "--sandbox", "--yes", "--owner-prefix", "ci-"])
    assert exit_info.value.code == 2
    assert "`gpuflow reap --any-owner --owner-prefix ci- --sandbox`" in capsys.readouterr().err  # never the real account


def test_status_and_ssh_of_our_own_cluster_without_a_record(cloud, provisioners, gpuflow_home, capsys):
    ours = clusters.up(make_spec("lost-record"), provisioner_factory=provisioners)
    (gpuflow_home / "state" / "clusters" / "lost-record.json").unlink()  # launched from another machine
    shown = clusters.status("lost-record", provisioner_factory=provisioners)
    assert shown.state == "unmanaged" and [node.instance_id for node in shown.cluster.nodes] == [ours.head.instance_id]
    with pytest.raises(SystemExit) as exit_info:
        main(["ssh", "lost-record", "--", "true"])
    assert exit_info.value.code == 4
    assert "launched by this gpuflow elsewhere" in capsys.readouterr().err
    clusters.down("lost-record", region=REGION, provisioner_factory=provisioners)  # ours: down takes it
    assert leftovers(cloud, gpuflow_home) == {}
