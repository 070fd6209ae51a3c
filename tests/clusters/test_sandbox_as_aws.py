"""The sandbox behaves as AWS would: a cluster whose instance the fake cloud no longer runs
refuses run/sync/ssh (as a terminated EC2 instance does), and spot prices come from the
sandbox's seeded spot price history, not moto's placeholder $0.00001."""

from __future__ import annotations

import json

import boto3
import pytest

from gpuflow import clusters, jobs, nodes
from gpuflow.errors import InstanceGone
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.config import gpuflow_home
from infra.sandbox import in_process_sandbox, sandbox_endpoint, stop_sandbox
from infra.sandbox.seed import sandbox_spot_price


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


@pytest.fixture
def project(tmp_path, monkeypatch):
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "job.py").write_text("open('ran', 'w').write('yes')\n")
    monkeypatch.chdir(directory)
    return directory


def test_a_cluster_terminated_in_the_fake_cloud_refuses_run_sync_and_ssh(project, capfd):
    with in_process_sandbox():
        cluster = clusters.up(clusters.resolve_spec("box", {"sandbox": True}, project_dir=project))
        try:
            # Terminated outside gpuflow (the console, the dead-man's switch): the directory is still there.
            boto3.client("ec2", region_name="us-east-1").terminate_instances(InstanceIds=[cluster.head.instance_id])
            assert cli(["status", "box", "--json"]) == 0
            assert json.loads(capfd.readouterr().out)["state"] == "gone"
            directory = nodes.sandbox_directory(cluster)

            for argv in (["run", "box", "--", "python", "job.py"], ["sync", "box"]):
                assert cli(argv) == InstanceGone.exit_code, argv
                err = capfd.readouterr().err
                assert err.count("\n") == 1 and err.startswith("gpuflow: error: the instance "), err
                assert f"{cluster.head.instance_id} of cluster 'box' is no longer running (terminated)" in err
                assert "`gpuflow status box --sandbox` shows what happened to it" in err
            assert jobs.all_records() == []  # nothing was started
            assert not (directory / "project").exists() and not (directory / "runs").exists()
            with pytest.raises(InstanceGone, match="no longer running"):
                nodes.ssh_invocation(cluster, ["true"], probe=clusters.cloud_probe())
        finally:
            clusters.down("box", sandbox=True)


def test_an_instance_the_fake_cloud_does_not_know_is_gone_too(tmp_path):
    """The sandbox server was stopped (its state lost): the record's instance is missing."""

    class Probe:
        def instance_state(self, cluster, instance_id):
            return "not-found"

        def console_output(self, cluster, instance_id):  # pragma: no cover - not asked
            return ""

    cluster = Cluster(name="lost", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                      nodes=(Node("i-0123456789abcdef0", "running"),), sandbox=True)
    StateStore(gpuflow_home(), "clusters").put(cluster.name, cluster.to_dict())
    with pytest.raises(InstanceGone, match=r"i-0123456789abcdef0 of cluster 'lost' is no longer running \(not-found\)"):
        nodes.runner_for(cluster, probe=Probe())
    assert not nodes.sandbox_directory(cluster).exists()  # not re-created as a fresh "disk"


def test_sandbox_spot_prices_come_from_the_seeded_history(project, capfd):
    with in_process_sandbox():
        cluster = clusters.up(clusters.resolve_spec("spotty", {"sandbox": True, "spot": True}, project_dir=project))
        try:
            zone = cluster.head.availability_zone
            expected = sandbox_spot_price("us-east-1", zone, "g5.xlarge")
            assert 0.2 < expected < 1.006  # a plausible discount on the on-demand list price
            assert cluster.price_per_hour == pytest.approx(expected)
            assert cli(["status", "spotty", "--json"]) == 0
            shown = json.loads(capfd.readouterr().out)
            assert shown["price_per_hour"] == pytest.approx(expected)
            assert shown["price_source"] == "spot price history"
            assert cli(["ls"]) == 0
            assert f"${expected:.4f}" in capfd.readouterr().out
            history = boto3.client("ec2", region_name="us-east-1").describe_spot_price_history(
                InstanceTypes=["g5.xlarge"], AvailabilityZone=zone
            )["SpotPriceHistory"]
            assert len(history) >= 2 and {entry["AvailabilityZone"] for entry in history} == {zone}
            latest = max(history, key=lambda entry: entry["Timestamp"])
            assert float(latest["SpotPrice"]) == pytest.approx(expected)
        finally:
            clusters.down("spotty", sandbox=True)


def test_the_sandbox_server_serves_the_same_spot_history(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    try:
        url = sandbox_endpoint(home)
        ec2 = boto3.client("ec2", region_name="eu-west-1", endpoint_url=url,
                           aws_access_key_id="gpuflow-sandbox", aws_secret_access_key="gpuflow-sandbox")
        history = ec2.describe_spot_price_history(InstanceTypes=["g4dn.xlarge"])["SpotPriceHistory"]
        assert history, "no spot history for g4dn.xlarge in eu-west-1"
        for entry in history:
            assert entry["InstanceType"] == "g4dn.xlarge"
        zone = history[0]["AvailabilityZone"]
        latest = max((entry for entry in history if entry["AvailabilityZone"] == zone), key=lambda e: e["Timestamp"])
        assert float(latest["SpotPrice"]) == pytest.approx(sandbox_spot_price("eu-west-1", zone, "g4dn.xlarge"))
    finally:
        stop_sandbox(home)
