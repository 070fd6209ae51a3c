"""Where a named cluster's runs execute: the default target resolver, and the cluster rules a run command uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpuflow import clusters, nodes, sync
from gpuflow.errors import NotFound, UsageError
from gpuflow.jobs.records import NodeTarget, RunTarget
from gpuflow.nodes import node_alive
from gpuflow.records import Cluster, Node
from gpuflow.state import validate_name

# Turns a cluster name into the target its runs execute on (tests pass their own).
TargetResolver = Callable[[str], RunTarget]


def target_for_cluster(cluster_name: str, *, project_dir: Path | None = None) -> RunTarget:
    """The default resolver: the cluster's record, its runner and the project sync,
    reached as the config of the project at ``project_dir`` says (a loopback sshd)."""
    cluster = clusters.get_cluster(cluster_name, project_dir=project_dir)

    def sync_project(project_dir: Path) -> object:
        return sync.sync_project(cluster, project_dir)

    def sync_data(data_dir: Path) -> object:
        return sync.sync_data(cluster, data_dir, project_dir=project_dir)

    scans = sync.SharedScans()
    return RunTarget(
        cluster=cluster, connect=lambda: nodes.runner_for(cluster, project_dir=project_dir), sync_project=sync_project,
        sync_data=sync_data, instance_alive=lambda: node_alive(cluster, project_dir=project_dir),
        nodes=tuple(_node_target(cluster, node, project_dir, scans) for node in cluster.nodes),
    )


def _node_target(cluster: Cluster, node: Node, project_dir: Path | None, scans: sync.SharedScans) -> NodeTarget:
    """One node as a multi-node run reaches it (its private address for the other workers); the
    nodes' syncs, run in parallel, share one scan of the project (and of the data directory)."""
    return NodeTarget(
        instance_id=node.instance_id,
        host="127.0.0.1" if cluster.sandbox else (node.private_ip or node.public_ip or ""),
        connect=lambda: nodes.runner_for(cluster, node, project_dir=project_dir),
        sync_project=lambda directory: sync.sync_project(cluster, directory, node=node, scans=scans),
        sync_data=lambda directory: sync.sync_data(cluster, directory, project_dir=project_dir, node=node, scans=scans),
        sandbox=bool(cluster.sandbox),
    )


def resolve_cluster_name(name: str | None, *, project_dir: Path | None = None) -> str:
    """The cluster a command means (NAME, the project's ``cluster`` setting,
    or the only cluster): the provisioning layer's rule, used as is."""
    return clusters.resolve_cluster_name(name, project_dir=project_dir)


def is_known_cluster(name: str) -> bool:
    """Whether ``name`` is a live cluster in the local cache (no cloud call):
    tells ``run NAME -- CMD`` from ``run MODULE -- ARGS``."""
    try:
        clusters.get_cluster(validate_name(name, "cluster name"))
    except (NotFound, UsageError):
        return False
    return True


def up_spec_for_run(name: str | None, *, project_dir: Path, **options: Any) -> Any:
    """The ClusterSpec `run --up` launches: options > project config > defaults
    (the provisioning layer's :func:`gpuflow.clusters.resolve_spec`)."""
    return clusters.resolve_spec(name, options, project_dir=project_dir)
