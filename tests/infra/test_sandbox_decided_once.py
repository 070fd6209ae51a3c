"""The sandbox is decided once: the sandbox provisioner answers what `up` asks of any
cloud (the spot role), and sync and a run's liveness ask gpuflow.nodes how a cluster
is reached instead of looking at the runner's type or the record's flag."""

from __future__ import annotations

from gpuflow import clusters
from gpuflow.nodes import node_alive, sandbox_directory
from gpuflow.records import ClusterSpec
from gpuflow.sync.cluster import destination_for
from gpuflow.sync.plan import LocalDestination
from infra.sandbox import in_process_sandbox


def test_a_sandbox_spot_cluster_needs_no_iam_role_and_is_reached_as_a_directory(gpuflow_home, monkeypatch):
    monkeypatch.delenv("GPUFLOW_SANDBOX_SSH", raising=False)
    with in_process_sandbox():
        cluster = clusters.up(ClusterSpec(name="spotbox", sandbox=True, spot=True, region="us-east-1"))
        try:
            destination = destination_for(cluster, "project")
            assert isinstance(destination, LocalDestination)
            assert destination.directory == sandbox_directory(cluster).resolve() / "project"
            assert node_alive(cluster) is True
        finally:
            assert clusters.down(cluster.name).terminated
        assert node_alive(cluster) is False  # its "disk" went with it
