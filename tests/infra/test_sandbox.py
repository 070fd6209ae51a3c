"""The sandbox cloud: the Deep Learning AMI seeding that the provisioner's AMI
lookup relies on, and the detached loopback moto server that keeps fake
clusters alive between gpuflow invocations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from gpuflow.errors import CloudError
from infra import sandbox
from infra.dlami import (
    DLAMI_BASE_SSM_PARAMETER,
    DLAMI_NAME_PATTERN,
    DLAMI_OWNER_ID,
    DLAMI_SSM_PARAMETER,
)
from infra.sandbox import (
    in_process_sandbox,
    read_server_record,
    sandbox_endpoint,
    seed_deep_learning_ami,
    stop_sandbox,
)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def _resolve_dlami(region: str, endpoint_url: str | None = None) -> tuple[str, list[str]]:
    """What the provisioner does: the SSM parameter, and the describe_images fallback."""
    ssm = boto3.client("ssm", region_name=region, endpoint_url=endpoint_url)
    ec2 = boto3.client("ec2", region_name=region, endpoint_url=endpoint_url)
    parameter_value = ssm.get_parameter(Name=DLAMI_SSM_PARAMETER)["Parameter"]["Value"]
    images = ec2.describe_images(
        Owners=[DLAMI_OWNER_ID], Filters=[{"Name": "name", "Values": [DLAMI_NAME_PATTERN]}]
    )["Images"]
    return parameter_value, [image["ImageId"] for image in images]


# --- seeding --------------------------------------------------------------------------------


def test_seeding_makes_the_dlami_resolvable_and_launchable():
    with mock_aws():
        with pytest.raises(Exception, match="ParameterNotFound"):
            _resolve_dlami("eu-west-1")  # moto alone lacks it: this is the gap being filled
        ami_id = seed_deep_learning_ami("eu-west-1")
        parameter_value, image_ids = _resolve_dlami("eu-west-1")
        assert parameter_value == ami_id
        assert image_ids == [ami_id]
        ssm = boto3.client("ssm", region_name="eu-west-1")
        assert ssm.get_parameter(Name=DLAMI_BASE_SSM_PARAMETER)["Parameter"]["Value"] == ami_id
        image = boto3.client("ec2", region_name="eu-west-1").describe_images(ImageIds=[ami_id])["Images"][0]
        assert image["OwnerId"] == DLAMI_OWNER_ID and image["Architecture"] == "x86_64"
        assert image["RootDeviceType"] == "ebs"
        launched = boto3.client("ec2", region_name="eu-west-1").run_instances(
            ImageId=ami_id, MinCount=1, MaxCount=1, InstanceType="g5.xlarge"
        )
        assert launched["Instances"][0]["ImageId"] == ami_id
        # Other regions are untouched until seeded.
        with pytest.raises(Exception, match="ParameterNotFound"):
            _resolve_dlami("us-west-2")


def test_seeding_is_idempotent():
    with mock_aws():
        first = seed_deep_learning_ami("us-east-1")
        second = seed_deep_learning_ami("us-east-1")
        assert first == second
        assert _resolve_dlami("us-east-1") == (first, [first])
        history = boto3.client("ssm", region_name="us-east-1").get_parameter_history(Name=DLAMI_SSM_PARAMETER)
        assert len(history["Parameters"]) == 1


def test_in_process_sandbox_seeds_the_requested_regions_and_any_other_on_first_use():
    with in_process_sandbox(("us-east-1", "ap-south-1")) as amis:
        assert set(amis) == {"us-east-1", "ap-south-1"}
        for region, ami_id in amis.items():
            assert _resolve_dlami(region) == (ami_id, [ami_id])
        # A region the caller did not name: seeded by its first request.
        parameter_value, image_ids = _resolve_dlami("sa-east-1")
        assert image_ids == [parameter_value] and parameter_value not in amis.values()
    # Afterwards a fresh mock holds no seeded state (nothing leaked between sandboxes).
    with mock_aws():
        with pytest.raises(Exception, match="ParameterNotFound"):
            boto3.client("ssm", region_name="sa-east-1").get_parameter(Name=DLAMI_SSM_PARAMETER)


# --- the detached server ----------------------------------------------------------------------


@pytest.fixture
def sandbox_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    yield home
    stop_sandbox(home)


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state owned by ``pid`` (Linux /proc)."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:
                addresses.append(f"{table}:{local}")
    return addresses


def test_server_starts_on_loopback_only_and_serves_the_seeded_dlami(sandbox_home):
    url = sandbox_endpoint(sandbox_home)
    record = read_server_record(sandbox_home)
    assert record is not None and url == record.url
    assert url.startswith("http://127.0.0.1:")
    assert record.pid != os.getpid()
    port_hex = f"{record.port:04X}"
    assert _listening_addresses(record.pid) == [f"tcp:0100007F:{port_hex}"]

    # The default region is seeded at start; any other region on its first request.
    for region in ("us-east-1", "eu-central-1"):
        parameter_value, image_ids = _resolve_dlami(region, endpoint_url=url)
        assert image_ids == [parameter_value]
    log = (sandbox_home / "sandbox" / ".moto-server" / "server.log").read_text()
    assert "listening on http://127.0.0.1:" in log
    assert "GET /" not in log  # no line per request: the log stays small


def test_server_is_reused_and_keeps_state_across_processes(sandbox_home):
    program = """
import sys, boto3
from pathlib import Path
from infra.sandbox import sandbox_endpoint
url = sandbox_endpoint(Path(sys.argv[1]))
ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=url)
if sys.argv[2] == "create":
    ec2.create_security_group(GroupName="gpuflow-kept", Description="made by process one")
names = [group["GroupName"] for group in ec2.describe_security_groups()["SecurityGroups"]]
print(url, "gpuflow-kept" in names)
"""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)}

    def run(step: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", program, str(sandbox_home), step],
            capture_output=True, text=True, timeout=60, env=environment, check=True,
        ).stdout.strip()

    first = run("create")
    record = read_server_record(sandbox_home)
    second = run("look")
    assert first.endswith(" True") and second.endswith(" True")
    assert first.split()[0] == second.split()[0] == record.url
    assert read_server_record(sandbox_home) == record  # the same server, not a new one
    assert sandbox_endpoint(sandbox_home) == record.url


def test_stop_ends_the_server_and_the_next_start_is_fresh(sandbox_home):
    url = sandbox_endpoint(sandbox_home)
    record = read_server_record(sandbox_home)
    boto3.client("ec2", region_name="us-east-1", endpoint_url=url).create_key_pair(KeyName="gpuflow-old")

    assert stop_sandbox(sandbox_home) is True
    assert read_server_record(sandbox_home) is None
    assert not Path(f"/proc/{record.pid}").exists()
    assert stop_sandbox(sandbox_home) is False  # idempotent

    fresh_url = sandbox_endpoint(sandbox_home)
    pairs = boto3.client("ec2", region_name="us-east-1", endpoint_url=fresh_url).describe_key_pairs()["KeyPairs"]
    assert "gpuflow-old" not in [pair["KeyName"] for pair in pairs]


def test_a_dead_server_is_replaced(sandbox_home):
    sandbox_endpoint(sandbox_home)
    dead = read_server_record(sandbox_home)
    os.kill(dead.pid, signal.SIGKILL)
    os.waitpid(dead.pid, 0)
    url = sandbox_endpoint(sandbox_home)
    replacement = read_server_record(sandbox_home)
    assert replacement.pid != dead.pid
    assert _resolve_dlami("us-east-1", endpoint_url=url)[0]


def test_a_record_naming_an_unrelated_process_is_never_killed(sandbox_home):
    """A stale record whose pid now belongs to someone else: start a new server,
    and leave that process alone."""
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        record_path = sandbox_home / "sandbox" / ".moto-server" / "server.json"
        record_path.parent.mkdir(parents=True)
        record_path.write_text(json.dumps({"pid": bystander.pid, "port": 9, "started_at": time.time()}))
        url = sandbox_endpoint(sandbox_home)
        assert read_server_record(sandbox_home).pid != bystander.pid
        assert bystander.poll() is None
        assert stop_sandbox(sandbox_home) is True
        assert bystander.poll() is None
        assert url.startswith("http://127.0.0.1:")
    finally:
        bystander.kill()
        bystander.wait()


def test_server_identity_is_checked_before_signalling(sandbox_home, tmp_path):
    """Through /proc, and through ps where there is no /proc (macOS)."""
    sandbox_endpoint(sandbox_home)
    server = read_server_record(sandbox_home)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for proc in (Path("/proc"), tmp_path / "no-proc"):
            assert sandbox._is_our_server_process(server.pid, proc=proc) is True
            assert sandbox._is_our_server_process(bystander.pid, proc=proc) is False
            assert sandbox._is_our_server_process(os.getpid(), proc=proc) is False
    finally:
        bystander.kill()
        bystander.wait()


def test_a_server_that_cannot_start_is_a_clear_error(sandbox_home, monkeypatch):
    monkeypatch.setattr(sandbox.sys, "executable", "/bin/false")
    with pytest.raises(CloudError, match="sandbox cloud .* exited at start"):
        sandbox_endpoint(sandbox_home, startup_timeout=10)
    assert read_server_record(sandbox_home) is None


def test_importing_the_sandbox_and_userdata_modules_stays_cheap():
    """The CLI imports these lazily, but even then moto/boto3 load only when a
    sandbox is actually used."""
    program = (
        "import sys, infra.sandbox, infra.userdata, infra.dlami; "
        "print(sorted(m for m in ('moto', 'boto3', 'botocore', 'werkzeug', 'flask') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)},
    ).stdout.strip()
    assert loaded == "[]"


def test_the_server_goes_with_the_last_sandbox_cluster(gpuflow_home, tmp_path):
    """up --sandbox and down in separate gpuflow processes share the loopback
    server; once the last sandbox cluster is down nothing gpuflow started is
    left running on this machine."""
    environment = {**os.environ, "GPUFLOW_HOME": str(gpuflow_home), "PYTHONPATH": str(REPOSITORY_ROOT)}

    def gpuflow(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gpuflow", *argv], capture_output=True, text=True, env=environment,
            cwd=tmp_path, timeout=120,
        )

    for name in ("first", "second"):
        assert gpuflow("up", name, "--sandbox").returncode == 0
    record = sandbox.read_server_record(gpuflow_home)
    assert record is not None
    assert gpuflow("down", "first", "--yes").returncode == 0
    assert sandbox.read_server_record(gpuflow_home) == record  # still needed by "second"
    assert gpuflow("status", "second").returncode == 0
    down = gpuflow("down", "second", "--yes")
    assert down.returncode == 0, down.stderr
    assert sandbox.read_server_record(gpuflow_home) is None
    assert sandbox._has_exited(record.pid)  # gone (or a zombie awaiting its reaper)
    # Read-only looks at the sandbox start a server to ask it, and stop it again.
    assert "already down" in gpuflow("down", "second", "--yes").stdout
    assert sandbox.read_server_record(gpuflow_home) is None
    dry_reap = gpuflow("reap", "--sandbox")
    assert dry_reap.returncode == 0 and "nothing to reap" in dry_reap.stdout, dry_reap.stderr
    assert sandbox.read_server_record(gpuflow_home) is None
    (tmp_path / "gpuflow.toml").write_text("sandbox = true\n")
    assert gpuflow("ls").returncode == 0
    assert sandbox.read_server_record(gpuflow_home) is None


# --- terminating a sandbox instance -----------------------------------------------------------


def test_terminating_a_sandbox_instance_ends_its_processes_and_directory(gpuflow_home):
    """The sandbox provisioner (picked once, by open_provisioner) does to a sandbox
    instance what EC2 does to a real one — also for an instance the fake cloud no
    longer knows (its server restarted), whose directory is found by its id — and
    spares a process that is not the instance's."""
    from infra.aws import open_provisioner
    from infra.aws.provisioner import SandboxProvisioner

    started: list[subprocess.Popen] = []

    def process_of_run(run_dir: Path) -> subprocess.Popen:
        run_dir.mkdir(parents=True)
        process = subprocess.Popen(["sleep", "120"], env={**os.environ, "GPUFLOW_RUN_DIR": str(run_dir)},
                                   start_new_session=True)
        started.append(process)
        return process

    try:
        with in_process_sandbox():
            provisioner = open_provisioner("us-east-1", sandbox=True)
            assert isinstance(provisioner, SandboxProvisioner)
            ec2 = boto3.client("ec2", region_name="us-east-1")
            image = ec2.describe_images(Owners=[DLAMI_OWNER_ID])["Images"][0]["ImageId"]
            [instance] = ec2.run_instances(
                ImageId=image, MinCount=1, MaxCount=1,
                TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "gpuflow:cluster", "Value": "c1"}]}],
            )["Instances"]
            known = gpuflow_home / "sandbox" / "c1" / instance["InstanceId"]
            job = process_of_run(known / "runs" / "20260101-000000-aaaa")
            forgotten = gpuflow_home / "sandbox" / "c2" / "i-0123456789abcdef0"
            orphan_job = process_of_run(forgotten / "runs" / "20260101-000000-bbbb")
            bystander = process_of_run(gpuflow_home / "elsewhere" / "runs" / "x")

            provisioner.terminate([instance["InstanceId"], "i-0123456789abcdef0"])

            assert job.wait(timeout=10) == -signal.SIGKILL
            assert orphan_job.wait(timeout=10) == -signal.SIGKILL
            assert not (gpuflow_home / "sandbox" / "c1").exists()
            assert not (gpuflow_home / "sandbox" / "c2").exists()
            assert bystander.poll() is None
            state = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][0]
            assert state["State"]["Name"] == "terminated"
    finally:
        for process in started:
            process.kill()
            process.wait()
