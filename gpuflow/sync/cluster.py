"""Sync to a cluster: where its head node's project and data directories are, and the ``gpuflow sync`` use case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpuflow import nodes
from gpuflow.clusters import get_cluster, resolve_cluster_name
from gpuflow.config import project_config
from gpuflow.nodes import Reach, access_for
from gpuflow.records import Cluster, Node
from gpuflow.state import validate_name
from gpuflow.sync.engine import DEFAULT_LARGE_BYTES, DEFAULT_LARGE_FILES, sync_directory
from gpuflow.sync.ignore import PROJECT_SKIPPED_TOP_LEVEL
from gpuflow.sync.plan import Destination, LocalDestination, SSHDestination, SyncReport


def destination_for(
    cluster: Cluster, subdirectory: str, *, project_dir: Path | None = None, node: Node | None = None
) -> Destination:
    """Where ``<base>/<subdirectory>`` of a cluster's head node (or ``node``) is, for sync.

    * a sandbox cluster without a loopback sshd: its LocalRunner directory
      ``$GPUFLOW_HOME/sandbox/<cluster>/<instance-id>`` on this machine;
    * a sandbox cluster with one (``GPUFLOW_SANDBOX_SSH``): that directory,
      reached through the loopback sshd, as a real instance would be;
    * a real instance: ``gpuflow/<subdirectory>`` under the login home, i.e.
      ``$HOME/gpuflow``, the SSH runner's base directory.

    Host keys are pinned before the system ``ssh`` runs (from the console
    output, by :func:`gpuflow.nodes.ensure_host_keys`); when the console
    printed only fingerprints, one connection through the SSH runner, which
    accepts exactly a key with such a fingerprint, pins the key first.
    """
    node = node or cluster.head
    reach = access_for(cluster, project_dir=project_dir).reach  # decided once, by gpuflow.nodes
    if reach is not Reach.SSH:
        runner = nodes.runner_for(cluster, node, project_dir=project_dir)  # pins a loopback sshd's key; connects lazily
        try:
            if reach is Reach.DIRECTORY:
                return LocalDestination(Path(runner.base_dir) / subdirectory)
        finally:
            runner.close()
        directory = nodes.sandbox_directory(cluster, node)
        return SSHDestination(nodes.ssh_target_for(cluster, node, project_dir=project_dir), f"{directory}/{subdirectory}")
    target = nodes.ssh_target_for(cluster, node)
    if nodes.ensure_host_keys(cluster, node, target):
        runner = nodes.runner_for(cluster, node)
        try:
            runner.run(["true"])
        finally:
            runner.close()
    return SSHDestination(target, f"gpuflow/{subdirectory}")


def sync_project(cluster: Cluster, project_dir: Path, *, node: Node | None = None, **options: Any) -> SyncReport:
    """Push the project to ``<base>/project/`` of the head node (or ``node``; the top-level ``runs/`` stays home)."""
    options.setdefault("skip_top_level", tuple(PROJECT_SKIPPED_TOP_LEVEL))
    destination = destination_for(cluster, "project", project_dir=project_dir, node=node)
    return sync_directory(Path(project_dir), destination, **options)


def data_name(data_dir: Path) -> str:
    """The remote name of a data directory: its basename, which must be a plain name."""
    return validate_name(Path(data_dir).expanduser().resolve().name, "data directory name")


def sync_data(
    cluster: Cluster, data_dir: Path, *, project_dir: Path | None = None, node: Node | None = None, **options: Any
) -> SyncReport:
    """Push a data directory to ``<base>/data/<basename>/`` of the head node (or ``node``), where
    later runs find it (``project_dir``: the project whose config says how the cluster is reached)."""
    destination = destination_for(cluster, f"data/{data_name(data_dir)}", project_dir=project_dir, node=node)
    return sync_directory(Path(data_dir), destination, **options)


def sync_cluster(
    cluster_name: str | None = None,
    *,
    data_dir: Path | None = None,
    project_dir: Path | None = None,
    **options: Any,
) -> SyncReport:
    """The ``gpuflow sync`` use case: the project (or ``data_dir``) to a cluster.

    The cluster defaults as everywhere (the project's ``cluster`` setting, else
    the only cluster).  The large-tree thresholds come from the project
    settings ``sync_warn_gb`` (default 1) and ``sync_warn_files`` (default
    20000) unless given.
    """
    config = project_config(project_dir)  # typed and validated by the reader
    warn_gb, warn_files = config.sync.sync_warn_gb, config.sync.sync_warn_files
    options.setdefault("large_bytes", int(warn_gb * 1e9) if warn_gb is not None else DEFAULT_LARGE_BYTES)
    options.setdefault("large_files", warn_files if warn_files is not None else DEFAULT_LARGE_FILES)
    if cluster_name is None:
        cluster_name = resolve_cluster_name(None, project_dir=config.root)
    cluster = get_cluster(cluster_name)
    if data_dir is not None:
        return sync_data(cluster, Path(data_dir), project_dir=config.root, **options)
    return sync_project(cluster, config.root, **options)
