"""Tests run *by* the plugin's tests, in a project made by `gpuflow init` outside the repository
(copied there as tests/test_scenarios.py).  Each writes what it made to $SCENARIO_OUT/<test>.json,
so the outer test can check that the teardown message names exactly that."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OUT = Path(os.environ["SCENARIO_OUT"])


def note(name, **facts):
    (OUT / f"{name}.json").write_text(json.dumps(facts))


def test_up_run_down_leaves_nothing(gpuflow_sandbox):
    cluster = gpuflow_sandbox.up(count=2)
    assert len(cluster.nodes) == 2
    run = gpuflow_sandbox.run("train.py", "--epochs", "1", env={"GPUFLOW_SMOKE": "1"})
    assert run.exit_code == 0 and run.ok, run.log
    assert "smoke=1 args=['--epochs', '1']" in run.log
    assert run.metrics == {"accuracy": 0.5, "smoke": "1"}
    assert run.manifest["run_id"] == run.run_id
    assert run.outputs == run.local_dir / "outputs" and (run.outputs / "model.txt").read_text() == "weights"
    assert not (gpuflow_sandbox.project_dir / "runs").exists()  # pulled into the test's directory, not the project
    assert gpuflow_sandbox.project_dir not in run.local_dir.parents
    gpuflow_sandbox.down()
    assert gpuflow_sandbox.leftovers() == []
    from gpuflow.clusters import owner_id

    note("clean", home=str(gpuflow_sandbox.home), local_dir=str(run.local_dir), owner=owner_id())


def test_a_failing_job_gives_its_exit_code(gpuflow_sandbox):
    gpuflow_sandbox.up()
    run = gpuflow_sandbox.run(["python", "train.py"], env={"EXIT_WITH": "3"})
    assert run.exit_code == 3 and not run.ok
    assert "exiting with 3" in run.log
    gpuflow_sandbox.down()


def test_any_spec_spot_in_another_region(gpuflow_sandbox):
    gpuflow_sandbox.up("spotty", spot=True, region="eu-west-1", instance_type="g4dn.xlarge")
    [reservation] = gpuflow_sandbox.client(region="eu-west-1").describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["running"]}])["Reservations"]
    [instance] = reservation["Instances"]
    assert instance["InstanceType"] == "g4dn.xlarge" and instance.get("InstanceLifecycle") == "spot"
    gpuflow_sandbox.down("spotty")


def _image(ec2):
    return ec2.describe_images()["Images"][0]["ImageId"]


def test_leak_instance(gpuflow_sandbox):
    ec2 = gpuflow_sandbox.client()
    [instance] = ec2.run_instances(ImageId=_image(ec2), MinCount=1, MaxCount=1, InstanceType="g5.xlarge")["Instances"]
    note("instance", id=instance["InstanceId"])


def test_leak_security_group(gpuflow_sandbox):
    group = gpuflow_sandbox.client().create_security_group(GroupName="left-open", Description="leak")
    note("security_group", id=group["GroupId"])


def test_leak_key_pair(gpuflow_sandbox):
    gpuflow_sandbox.client().create_key_pair(KeyName="left-key")
    note("key_pair", id="left-key")


def test_leak_sandbox_directory(gpuflow_sandbox):
    directory = gpuflow_sandbox.home / "sandbox" / "ghost" / "i-0123456789abcdef0"
    directory.mkdir(parents=True)
    note("sandbox_directory", id=str(directory))


def test_leak_job_process(gpuflow_sandbox):
    run_dir = gpuflow_sandbox.home / "sandbox" / "gone" / "i-0fedcba987654321" / "runs" / "r1"
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"],
        env={**os.environ, "GPUFLOW_RUN_DIR": str(run_dir)}, start_new_session=True,
    )
    note("job_process", id=str(process.pid))


def test_leak_up_without_down_job_still_running(gpuflow_sandbox):
    cluster = gpuflow_sandbox.up("shared")
    run = gpuflow_sandbox.run("python -c 'import time; time.sleep(300)'", detach=True)
    assert run.exit_code is None
    note("up_without_down", id=cluster.nodes[0].instance_id, home=str(gpuflow_sandbox.home))


def test_the_next_test_sees_nothing_of_the_last(gpuflow_sandbox):
    assert gpuflow_sandbox.clusters() == []
    assert gpuflow_sandbox.client().describe_instances()["Reservations"] == []
    assert gpuflow_sandbox.client().describe_key_pairs()["KeyPairs"] == []
    assert os.environ["GPUFLOW_HOME"] == str(gpuflow_sandbox.home)
    # The outer run set a real-looking profile, key and shared owner id: none of them reaches the sandbox.
    assert "AWS_PROFILE" not in os.environ and "GPUFLOW_OWNER_ID" not in os.environ
    assert os.environ["AWS_ACCESS_KEY_ID"] != "AKIAREALKEY" and os.environ["AWS_CONFIG_FILE"] == os.devnull
    from gpuflow.clusters import owner_id

    note("isolated", home=str(gpuflow_sandbox.home), owner=owner_id())


@pytest.mark.gpuflow_keep
def test_kept_home(gpuflow_sandbox):
    gpuflow_sandbox.up("kept")
    gpuflow_sandbox.down("kept")
    note("kept", home=str(gpuflow_sandbox.home))


def test_leak_spot_request_in_a_region_the_fixture_never_named(gpuflow_sandbox):
    import boto3

    ec2 = boto3.client("ec2", region_name="ap-south-1")  # not the fixture's client: found through moto's regions
    [request] = ec2.request_spot_instances(
        InstanceCount=1, LaunchSpecification={"ImageId": "ami-12345678", "InstanceType": "g5.xlarge"}
    )["SpotInstanceRequests"]
    note("spot_request", id=request["SpotInstanceRequestId"])


def test_leak_sandbox_server(gpuflow_sandbox):
    from infra.sandbox import read_server_record, sandbox_endpoint

    sandbox_endpoint(gpuflow_sandbox.home)  # what `gpuflow up --sandbox` in another process would start
    note("sandbox_server", id=str(read_server_record(gpuflow_sandbox.home).pid))


def test_leak_launch_template(gpuflow_sandbox):
    template = gpuflow_sandbox.client().create_launch_template(
        LaunchTemplateName="left-template", LaunchTemplateData={"InstanceType": "g5.xlarge"})["LaunchTemplate"]
    note("launch_template", id=template["LaunchTemplateId"])


def test_leak_volume(gpuflow_sandbox):
    ec2 = gpuflow_sandbox.client()
    volume = ec2.create_volume(AvailabilityZone=f"{gpuflow_sandbox.region}a", Size=8)
    note("volume", id=volume["VolumeId"])
