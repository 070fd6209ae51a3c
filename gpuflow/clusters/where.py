"""Where a command acts: the sandbox choice, the configured region, the provisioner factory, hints.

The sandbox is decided here once for the use cases (:func:`sandbox_in_effect`,
or the cluster record's own ``sandbox``), then handed to the provisioner
factory; nothing below branches on it again except the hints that must say
``--sandbox``.
"""

from __future__ import annotations

from pathlib import Path

from gpuflow.clusters.spec import default_region
from gpuflow.config import project_config
from gpuflow.errors import UsageError
from gpuflow.hints import command_hint  # noqa: F401 - the use cases' hints come from here
from gpuflow.nodes import CloudProbe, ProvisionerProbe
from gpuflow.provisioner import Provisioner, ProvisionerFactory, open_provisioner
from gpuflow.records import Cluster


def _default_provisioner(region: str, *, profile: str | None = None, sandbox: bool = False) -> Provisioner:
    return open_provisioner(region, profile=profile, sandbox=sandbox)


def _provisioner(factory: ProvisionerFactory | None, region: str, profile: str | None, sandbox: bool) -> Provisioner:
    return (factory or _default_provisioner)(region, profile=profile, sandbox=sandbox)


def _place(cluster: Cluster) -> str:
    """Where a cluster lives, for comparing and for messages: region, sandbox, profile."""
    return cluster.region + (" (sandbox)" if cluster.sandbox else "") + (f" (profile {cluster.profile})" if cluster.profile else "")


def _configured_region(project_dir: Path | None = None) -> str:
    """The project's ``region`` setting, else the built-in chain."""
    return project_config(project_dir).cluster.region or default_region()


def sandbox_in_effect(sandbox: bool | None = None, *, project_dir: Path | None = None) -> bool:
    """Whether the sandbox cloud is in effect where no cluster record decides:
    the ``--sandbox`` / ``--no-sandbox`` flag when given, else the project
    config's ``sandbox`` (False without one).  The one place this is decided;
    the provisioner factory is then called with it.  A recorded cluster is
    asked where it was made, except that a sandbox context never asks AWS
    about a recorded AWS cluster (:func:`_refuse_aws_record_in_sandbox`)."""
    if sandbox is not None:
        return bool(sandbox)
    return bool(project_config(project_dir).sandbox)


def _refuse_aws_record_in_sandbox(cluster: Cluster, sandbox: bool, command: str) -> None:
    if sandbox and not cluster.sandbox:
        raise UsageError(
            f"cluster {cluster.name!r} is an AWS cluster ({cluster.region}), but the sandbox is in effect here "
            "(--sandbox, or sandbox = true in the project config): nothing is asked of AWS",
            hint=f"`gpuflow {command} {cluster.name} --no-sandbox` acts on it",
        )


# --------------------------------------------------------------------------- what the SSH layer asks
def cloud_probe(provisioner_factory: ProvisionerFactory | None = None) -> CloudProbe:
    """What :mod:`gpuflow.nodes` may ask the cloud about a cluster's instances (its
    state, its console), through ``provisioner_factory`` (default: the EC2 one)."""
    return ProvisionerProbe(provisioner_factory)


def instance_state(cluster: Cluster, instance_id: str, *, provisioner_factory: ProvisionerFactory | None = None) -> str:
    """What EC2 says about one instance now: 'running', 'terminated', ...,
    or 'not-found'.  Lets the SSH layer tell a network blip from a dead instance."""
    return cloud_probe(provisioner_factory).instance_state(cluster, instance_id)


def console_output(cluster: Cluster, instance_id: str, *, provisioner_factory: ProvisionerFactory | None = None) -> str:
    """The instance's console text (cloud-init prints the SSH host key
    fingerprints there; the SSH layer pins them)."""
    return cloud_probe(provisioner_factory).console_output(cluster, instance_id)
