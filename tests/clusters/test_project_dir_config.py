"""The config read is the one of the project the command works on (`--project-dir`,
else the project around the current directory, decided at the CLI): region, sandbox,
cluster name and sandbox_ssh reach every reader, never the current directory's instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuflow import clusters
from gpuflow.errors import ClusterNotFound
from gpuflow.jobs.targets import target_for_cluster
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.transport.local import LocalRunner
from gpuflow.transport.ssh import SSHRunner

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjp7H/j4yi+qatVy0olrvXvY0qblbqcy1bObYqKy83U\n"


@pytest.fixture
def projects(tmp_path, monkeypatch):
    """P (named by the command) and Q (the current directory), configured differently."""
    named, here = tmp_path / "p", tmp_path / "q"
    named.mkdir()
    here.mkdir()
    (tmp_path / "host_key.pub").write_text(HOST_KEY)
    (named / "gpuflow.toml").write_text(
        'cluster = "from-p"\nregion = "ap-south-1"\nsandbox = true\n'
        f'[sandbox_ssh]\nhost = "127.0.0.1"\nport = 2299\nuser = "me"\nkey = "{tmp_path}/key"\n'
        f'host_key = "{tmp_path}/host_key.pub"\n'
    )
    (here / "gpuflow.toml").write_text('cluster = "from-q"\nregion = "eu-west-1"\nsandbox = false\n')
    monkeypatch.chdir(here)
    monkeypatch.delenv("GPUFLOW_SANDBOX_SSH", raising=False)
    return named, here


class _Recording:
    """A provisioner that records the regions it is opened for and finds nothing."""

    def __init__(self, opened: list) -> None:
        self.opened = opened

    def __call__(self, region, *, profile=None, sandbox=False):
        self.opened.append((region, sandbox))
        return self

    def __getattr__(self, name):
        return lambda *args, **kwargs: []


def test_cluster_name_sandbox_and_region_come_from_the_named_project(projects, gpuflow_home):
    named, here = projects
    assert clusters.resolve_cluster_name(None, project_dir=named) == "from-p"
    assert clusters.sandbox_in_effect(project_dir=named) is True
    assert clusters.resolve_spec(None, {}, project_dir=named).region == "ap-south-1"
    assert clusters.resolve_cluster_name(None, project_dir=here) == "from-q"  # the other project: its own


def test_ls_down_and_reap_look_in_the_named_projects_region_and_cloud(projects, gpuflow_home):
    named, _here = projects
    opened: list = []
    factory = _Recording(opened)
    assert list(clusters.list_clusters(project_dir=named, provisioner_factory=factory)) == []
    assert set(opened) == {("ap-south-1", True)}
    opened.clear()
    with pytest.raises(ClusterNotFound):
        clusters.down("ghost", project_dir=named, provisioner_factory=factory)
    assert set(opened) == {("ap-south-1", True)}
    opened.clear()
    clusters.reap(project_dir=named, provisioner_factory=factory)
    assert set(opened) == {("ap-south-1", True)}


def test_a_run_reaches_the_sandbox_as_the_named_projects_config_says(projects, gpuflow_home, monkeypatch):
    from gpuflow import nodes

    # A hand-made sandbox record: the fake cloud is taken to say its instance runs (this test is about config).
    monkeypatch.setattr(nodes.ProvisionerProbe, "instance_state", lambda self, cluster, instance_id: "running")
    named, here = projects
    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678",
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),), sandbox=True,
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    runner = target_for_cluster("box", project_dir=named).connect()  # P: a loopback sshd plays the instance
    assert isinstance(runner, SSHRunner) and runner.target.port == 2299
    assert isinstance(target_for_cluster("box", project_dir=here).connect(), LocalRunner)  # Q: none
