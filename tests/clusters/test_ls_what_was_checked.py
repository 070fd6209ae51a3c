"""`gpuflow ls` shows what it could check and says, in one line, what it could not and why
(no usable credentials, AWS unreachable): exit 0 when something was checked, the error's
own exit code when nothing could be."""

from __future__ import annotations

import json

import pytest

from gpuflow import clusters
from gpuflow.config import gpuflow_home
from gpuflow.errors import CloudError, CredentialsError
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from infra.sandbox import in_process_sandbox


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


@pytest.fixture
def project(tmp_path, monkeypatch):
    directory = tmp_path / "project"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


def _aws_record(name: str = "billing", region: str = "us-east-1") -> None:
    cluster = Cluster(name=name, region=region, instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                      nodes=(Node("i-0123456789abcdef0", "running", public_ip="203.0.113.9"),), price_per_hour=1.006)
    StateStore(gpuflow_home(), "clusters").put(name, cluster.to_dict())


def _failing_aws(error):
    """The default provisioner factory, except that AWS itself (not the sandbox) fails with ``error``."""
    from gpuflow.clusters.where import _default_provisioner

    class Failing:
        def find_instances(self, **_):
            raise error

    def factory(region, *, profile=None, sandbox=False):
        return _default_provisioner(region, profile=profile, sandbox=sandbox) if sandbox else Failing()

    return factory


NO_CREDENTIALS = CredentialsError("no usable AWS credentials found", hint="run `aws configure`, set AWS_PROFILE, or pass --profile")
UNREACHABLE = CloudError("cannot reach the AWS endpoint for describe_instances: Could not connect", hint="check the network")


@pytest.mark.parametrize("error", [NO_CREDENTIALS, UNREACHABLE], ids=["no credentials", "offline"])
def test_sandbox_clusters_are_listed_and_what_aws_could_not_tell_is_said(project, monkeypatch, capfd, error):
    monkeypatch.setattr("gpuflow.clusters.where._default_provisioner", _failing_aws(error))
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("sb", {"sandbox": True}, project_dir=project))
        try:
            _aws_record("billing")
            code = cli(["ls"])  # a non-sandbox project: AWS is asked too
            out, err = capfd.readouterr()
            assert code == 0, err
            rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
            assert rows == {"sb": "running", "billing": "unchecked"}
            [line] = err.splitlines()
            assert line.startswith("gpuflow: warning: AWS was not checked (us-east-1): ")
            assert error.message in line and error.hint in line
            assert line.endswith("; its clusters recorded here (billing) are listed as unchecked")

            assert cli(["ls", "--json"]) == 0
            out, err = capfd.readouterr()
            assert {item["name"]: item["state"] for item in json.loads(out)} == {"sb": "running", "billing": "unchecked"}
            assert err.count("AWS was not checked") == 1
        finally:
            clusters.down("sb", sandbox=True)


@pytest.mark.parametrize("error", [NO_CREDENTIALS, UNREACHABLE], ids=["no credentials", "offline"])
def test_nothing_checked_is_an_error_with_its_own_exit_code(project, monkeypatch, capfd, error):
    monkeypatch.setattr("gpuflow.clusters.where._default_provisioner", _failing_aws(error))
    code = cli(["ls"])
    out, err = capfd.readouterr()
    assert code == error.exit_code
    assert out == ""  # never "no clusters": nothing was looked at
    [line] = err.splitlines()
    assert line.startswith("gpuflow: error: AWS was not checked (us-east-1): ") and error.message in line

    _aws_record("billing", region="eu-west-1")
    code = cli(["ls"])
    out, err = capfd.readouterr()
    assert code == error.exit_code
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["billing", "unchecked"]]
    assert err.count("\n") == 1 and "AWS was not checked (eu-west-1, us-east-1): " in err


def test_without_any_aws_credentials_the_real_client_says_so(project, monkeypatch, capfd):
    """No stand-in of gpuflow's own: botocore finds no credentials (no network is needed to find
    that out); the sandbox cluster lives in the sandbox server, as between separate commands."""
    from infra.sandbox import stop_sandbox

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    try:
        clusters.up(clusters.resolve_spec("sb", {"sandbox": True}, project_dir=project))
        code = cli(["ls"])
        out, err = capfd.readouterr()
        clusters.down("sb", sandbox=True)
    finally:
        stop_sandbox(gpuflow_home())
    assert code == 0, err
    assert out.splitlines()[1].split()[:2] == ["sb", "running"]
    assert "gpuflow: warning: AWS was not checked (us-east-1): no usable AWS credentials found" in err
    assert "listed as unchecked" not in err  # none recorded: nothing is said to be listed
