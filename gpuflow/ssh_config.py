"""`gpuflow ssh-config`: an OpenSSH include file with a Host entry per cluster node, pinned like gpuflow's own connections."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpuflow.config import gpuflow_home
from gpuflow.errors import GpuflowError
from gpuflow.nodes import Reach, access_for, ssh_target_for
from gpuflow.records import Cluster
from gpuflow.state import atomic_write_bytes
from gpuflow.transport import openssh


def ssh_config_path() -> Path:
    return gpuflow_home() / "ssh_config"


@dataclass(frozen=True)
class SshConfigReport:
    path: Path
    hosts: tuple[str, ...]  # Host aliases written
    skipped: tuple[str, ...]  # one line per cluster left out, and why
    include_line: str


def _config_value(value: str) -> str:
    """A path as ssh_config reads it: '%' is a token escape, spaces need quotes."""
    return openssh.option_value(value)


# Joins a cluster name and a node index in ssh-config aliases ("a+1" is node 1 of
# "a"): cluster names cannot hold it (validate_name), so no alias of one cluster
# can be another cluster's name or alias.
NODE_ALIAS_SEPARATOR = "+"


def node_alias(cluster_name: str, index: int) -> str:
    """The ssh-config Host alias of node ``index`` (0 is the head: the bare name)."""
    return cluster_name if index == 0 else f"{cluster_name}{NODE_ALIAS_SEPARATOR}{index}"


def ssh_config_text(clusters: Sequence[Cluster]) -> tuple[str, list[str], list[str]]:
    """The include file's text, the Host aliases in it, and what was left out."""
    lines = [
        "# Written by `gpuflow ssh-config`: one Host per cluster node, with the cluster's",
        "# pinned host keys. Regenerated on every run; do not edit.",
        "",
    ]
    hosts: list[str] = []
    skipped: list[str] = []
    for cluster in sorted(clusters, key=lambda record: record.name):
        if access_for(cluster).reach is Reach.DIRECTORY:
            skipped.append(f"{cluster.name}: sandbox cluster, runs on this machine (no SSH)")
            continue
        for index, node in enumerate(cluster.nodes):
            alias = node_alias(cluster.name, index)
            try:
                target = ssh_target_for(cluster, node)
            except GpuflowError as exc:
                skipped.append(f"{alias}: {exc.one_line()}")
                continue
            lines += [f"Host {alias}", f"    HostName {target.host}", *openssh.config_lines(target), ""]
            hosts.append(alias)
    return "\n".join(lines), hosts, skipped


def write_ssh_config(clusters: Sequence[Cluster], path: Path | None = None) -> SshConfigReport:
    """Write the include file (atomically) with a Host entry per node of ``clusters``
    (every cluster known here: :func:`gpuflow.clusters.known_clusters`)."""
    path = path or ssh_config_path()
    text, hosts, skipped = ssh_config_text(clusters)
    atomic_write_bytes(path, text.encode(), mode=0o600)
    return SshConfigReport(path, tuple(hosts), tuple(skipped), f"Include {_config_value(str(path))}")


def install_ssh_include(include_line: str, user_config: Path | None = None) -> bool:
    """Put ``include_line`` at the top of ~/.ssh/config (an Include after a
    Host block would only apply inside that block).  Idempotent: returns False
    when it is already there."""
    user_config = user_config or Path.home() / ".ssh" / "config"
    try:
        existing = user_config.read_text()
    except FileNotFoundError:
        existing = ""
    if any(line.strip() == include_line for line in existing.splitlines()):
        return False
    user_config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = user_config.stat().st_mode & 0o777 if user_config.exists() else 0o600
    header = f"# Added by `gpuflow ssh-config --install`: reach gpuflow clusters by name.\n{include_line}\n\n"
    atomic_write_bytes(user_config, (header + existing).encode(), mode=mode)
    return True
