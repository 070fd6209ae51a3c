"""Bad input, missing credentials, config defaults, SSH source detection and
the sandbox: one line, a non-zero exit, nothing created."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gpuflow import clusters
from gpuflow.cli import main
from gpuflow.errors import CloudError, ConfigError, CredentialsError, UsageError
from tests.infra.cloud import (
    CALLER_CIDR,
    REGION,
    leftovers,
    make_spec,
    no_network_detector,
)


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["up", "x", "--region", "mars-east-9"], 2, "unknown AWS region 'mars-east-9'"),
        (["up", "x", "--instance-type", "zz.huge"], 2, "instance type 'zz.huge' does not exist in us-east-1"),
        (["up", "x", "--instance-type", "p9.huge"], 2, "instance type 'p9.huge' does not exist"),
        (["up", "x", "--instance-type", "t3.micro"], 2, "instance type 't3.micro' has no GPU"),
        (["up", "x", "--ssh-cidr", "10.0.0.300/32"], 2, "invalid --ssh-cidr '10.0.0.300/32'"),
        (["up", "x", "--ssh-cidr", "0.0.0.0/0"], 2, "opens SSH to the whole internet"),
        (["up", "x", "--disk-gb", "-5"], 2, "--disk-gb must be a whole number of GiB"),
        (["up", "x", "--count", "0"], 2, "--count must be between 1"),
        (["up", "x", "--disk-gb", "10"], 2, "--disk-gb 10 is smaller than the AMI's root snapshot (15 GiB)"),
        (["up", "x", "--idle-minutes", "0"], 2, "--idle-minutes must be between"),
        (["up", "bad name;rm -rf ~"], 2, "invalid cluster name"),
        (["up", "x", "--ami", "ami-00000000deadbeef0"], 2, "AMI 'ami-00000000deadbeef0' does not exist"),
        (["up", "x", "--key-name", "nokey"], 2, "--key-name needs --key-path"),
        (["status", "nope"], 4, "no cluster named 'nope'"),
        (["down", "nope", "--yes"], 4, "no cluster named 'nope'"),
    ],
    ids=lambda value: value if isinstance(value, int) else None,
)
def test_bad_input_is_one_line_and_creates_nothing(cloud, gpuflow_home, capsys, argv, code, message):
    if argv[0] == "up" and "--ssh-cidr" not in argv:
        argv = [*argv, "--ssh-cidr", CALLER_CIDR]
    exit_code, out, err = _run(argv, capsys)
    assert exit_code == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpuflow: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert leftovers(cloud, gpuflow_home) == {}


def test_debug_shows_the_traceback(cloud, capsys, monkeypatch):
    monkeypatch.setenv("GPUFLOW_DEBUG", "1")
    exit_code, _, err = _run(["up", "x", "--region", "mars-east-9", "--ssh-cidr", CALLER_CIDR], capsys)
    assert exit_code == 2
    assert "Traceback" in err and "UsageError" in err


def test_missing_credentials_is_one_line(capsys, monkeypatch, gpuflow_home):
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    exit_code, _, err = _run(["up", "x", "--ssh-cidr", CALLER_CIDR], capsys)
    assert exit_code == 3
    assert err.strip() == (
        "gpuflow: error: no usable AWS credentials found (run `aws configure`, set AWS_PROFILE, or pass --profile)"
    )


def test_unknown_profile_is_one_line(capsys, gpuflow_home):
    exit_code, _, err = _run(["up", "x", "--profile", "no-such-profile", "--ssh-cidr", CALLER_CIDR], capsys)
    assert exit_code == 3
    assert "AWS profile 'no-such-profile' not found" in err and len(err.strip().splitlines()) == 1


def test_refused_credentials_map_to_credentials_error(cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("DescribeInstanceTypes", code="AuthFailure")
    with pytest.raises(CredentialsError, match="AuthFailure"):
        clusters.up(make_spec("refused"), provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_cpu_type_is_allowed_on_request(cloud, provisioners, gpuflow_home):
    cluster = clusters.up(make_spec("cpu", instance_type="t3.micro", allow_cpu=True), provisioner_factory=provisioners)
    assert cluster.instance_type == "t3.micro"
    assert cluster.price_per_hour is None  # not a GPU type: not in the price table
    clusters.down("cpu", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


# ---------------------------------------------------------------- where SSH may come from
def _ssh_ranges(ec2, group_id):
    rules = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"]
    return [(rule["FromPort"], ip_range["CidrIp"]) for rule in rules for ip_range in rule.get("IpRanges", [])]


def test_caller_address_is_detected_when_no_cidr_given(cloud, provisioners):
    cluster = clusters.up(
        make_spec("detected", ssh_cidr=None), provisioner_factory=provisioners, detect_caller_ip=lambda: "198.51.100.23"
    )
    assert _ssh_ranges(cloud, cluster.security_group_id) == [(22, "198.51.100.23/32")]


def test_failed_detection_stops_before_creating_anything(cloud, provisioners, gpuflow_home):
    def unreachable() -> str:
        raise CloudError("cannot detect your public IP address", hint="pass --ssh-cidr")

    with pytest.raises(CloudError, match="detect"):
        clusters.up(make_spec("undetected", ssh_cidr=None), provisioner_factory=provisioners, detect_caller_ip=unreachable)
    assert leftovers(cloud, gpuflow_home) == {}


def test_cli_uses_the_injectable_detector(cloud, gpuflow_home, capsys, monkeypatch):
    import infra.aws.caller_ip

    monkeypatch.setattr(infra.aws.caller_ip, "detect_caller_ip", lambda: "192.0.2.44")
    exit_code, out, _ = _run(["up", "detect-cli", "--json"], capsys)
    assert exit_code == 0
    group_id = json.loads(out)["security_group_id"]
    assert _ssh_ranges(cloud, group_id) == [(22, "192.0.2.44/32")]


def test_open_ssh_needs_explicit_consent_and_warns(cloud, provisioners):
    with pytest.raises(UsageError, match="whole internet"):
        clusters.up(make_spec("open", ssh_cidr="0.0.0.0/0"), provisioner_factory=provisioners)
    warnings = []
    cluster = clusters.up(
        make_spec("open", ssh_cidr="0.0.0.0/0", allow_ssh_from_anywhere=True),
        provisioner_factory=provisioners,
        warn=warnings.append,
    )
    assert _ssh_ranges(cloud, cluster.security_group_id) == [(22, "0.0.0.0/0")]
    assert any("whole internet" in warning for warning in warnings)


def test_sandbox_cluster_allows_loopback_only_and_never_detects(cloud, provisioners, gpuflow_home):
    with no_network_detector() as detector:
        cluster = clusters.up(make_spec("sand", ssh_cidr=None, sandbox=True), provisioner_factory=provisioners, detect_caller_ip=detector)
    assert cluster.sandbox
    assert _ssh_ranges(cloud, cluster.security_group_id) == [(22, "127.0.0.1/32")]
    assert clusters.status("sand", provisioner_factory=provisioners).state == "running"
    clusters.down("sand", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_sandbox_through_the_default_factory_uses_the_in_process_mock(cloud, gpuflow_home, capsys):
    exit_code, out, _ = _run(["up", "sandbox-cli", "--sandbox", "--json"], capsys)
    assert exit_code == 0
    assert json.loads(out)["sandbox"] is True
    exit_code, out, _ = _run(["down", "sandbox-cli", "--yes"], capsys)
    assert exit_code == 0
    assert leftovers(cloud, gpuflow_home) == {}


# ---------------------------------------------------------------- config precedence
def test_project_config_sets_defaults_and_options_win(tmp_path, monkeypatch):
    (tmp_path / "gpuflow.toml").write_text(
        'cluster = "from-config"\nregion = "eu-west-1"\ninstance-type = "g6.xlarge"\ndisk_gb = 150\nspot = true\n'
    )
    monkeypatch.chdir(tmp_path)
    spec = clusters.resolve_spec(None, {"disk_gb": None, "spot": None})
    assert (spec.name, spec.region, spec.instance_type, spec.disk_gb, spec.spot) == (
        "from-config", "eu-west-1", "g6.xlarge", 150, True,
    )
    spec = clusters.resolve_spec("cli-name", {"disk_gb": 60, "region": "us-west-2"})
    assert (spec.name, spec.region, spec.disk_gb, spec.instance_type) == ("cli-name", "us-west-2", 60, "g6.xlarge")
    assert clusters.resolve_cluster_name() == "from-config"


def test_built_in_defaults_without_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    spec = clusters.resolve_spec("plain", {})
    assert (spec.region, spec.instance_type, spec.count, spec.disk_gb, spec.idle_minutes, spec.max_hours, spec.spot) == (
        "us-east-1", "g5.xlarge", 1, 100, 60, 24.0, False,
    )


def test_config_with_a_wrong_type_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "gpuflow.toml").write_text('disk_gb = "lots"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="disk_gb must be of type int"):
        clusters.resolve_spec("x", {})


# ---------------------------------------------------------------- AMI resolution
def _image_of(ec2, cluster):
    return ec2.describe_instances(InstanceIds=[cluster.head.instance_id])["Reservations"][0]["Instances"][0]["ImageId"]


def test_ami_from_the_public_ssm_parameter(cloud, provisioners, api_calls):
    from infra.dlami import DLAMI_SANDBOX_IMAGE_NAME, DLAMI_SSM_PARAMETER
    from infra.sandbox import seed_deep_learning_ami

    cluster = clusters.up(make_spec("ami-ssm"), provisioner_factory=provisioners)
    assert _image_of(cloud, cluster) == seed_deep_learning_ami(REGION)
    assert "GetParametersByPath" in api_calls.calls
    assert (cluster.ami_parameter, cluster.ami_name) == (DLAMI_SSM_PARAMETER, DLAMI_SANDBOX_IMAGE_NAME)


def test_ami_by_name_when_the_parameter_is_missing(cloud, provisioners, api_calls):
    from infra.dlami import DLAMI_NAME_PATTERN
    from infra.sandbox import seed_deep_learning_ami

    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    seed_deep_learning_ami(REGION)
    get_backend("ssm")[DEFAULT_ACCOUNT_ID][REGION]._parameters.clear()  # the region publishes no parameter
    cluster = clusters.up(make_spec("ami-name"), provisioner_factory=provisioners)
    assert _image_of(cloud, cluster) == seed_deep_learning_ami(REGION)
    search = api_calls.params[api_calls.calls.index("DescribeImages")]
    assert {"Name": "name", "Values": [DLAMI_NAME_PATTERN]} in search["Filters"]


def test_explicit_ami_wins(cloud, provisioners, api_calls):
    image_id = cloud.register_image(Name="my-own-image", RootDeviceName="/dev/xvda")["ImageId"]
    root_device = cloud.describe_images(ImageIds=[image_id])["Images"][0]["RootDeviceName"]
    cluster = clusters.up(make_spec("ami-own", ami=image_id), provisioner_factory=provisioners)
    assert _image_of(cloud, cluster) == image_id
    assert "GetParameter" not in api_calls.calls and "GetParametersByPath" not in api_calls.calls
    run = api_calls.params[api_calls.calls.index("RunInstances")]
    assert run["BlockDeviceMappings"][0]["DeviceName"] == root_device  # the root device of that AMI


def test_no_deep_learning_ami_anywhere_asks_for_ami(provisioners, gpuflow_home, monkeypatch):
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    from moto import mock_aws

    with mock_aws():  # not seeded: like a region without the DLAMI
        with pytest.raises(UsageError, match="no AWS Deep Learning AMI found in us-east-1") as error:
            clusters.up(make_spec("ami-none"), provisioner_factory=provisioners)
    assert "--ami" in error.value.one_line()


def test_a_pinned_tensorflow_dlami_from_the_config_is_used_or_refused(cloud, provisioners, tmp_path, monkeypatch):
    from infra.dlami import DLAMI_SSM_PARAMETER

    (tmp_path / "gpuflow.toml").write_text('tensorflow_dlami = "2.17"\n')
    monkeypatch.chdir(tmp_path)
    spec = clusters.resolve_spec("ami-pin", {})
    assert spec.tensorflow_dlami == "2.17"
    with pytest.raises(UsageError, match="no TensorFlow 2.17 Deep Learning AMI in us-east-1"):
        clusters.up(replace(spec, region=REGION, ssh_cidr="203.0.113.9/32"), provisioner_factory=provisioners)
    cluster = clusters.up(replace(spec, region=REGION, ssh_cidr="203.0.113.9/32", tensorflow_dlami="2.18"), provisioner_factory=provisioners)
    assert cluster.ami_parameter == DLAMI_SSM_PARAMETER
