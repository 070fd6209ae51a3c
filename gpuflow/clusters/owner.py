"""Whose a cluster is: this gpuflow's owner id, splitting tagged resources by owner, explaining a name it does not know."""

from __future__ import annotations

import getpass
import os
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpuflow.clusters.record import _live, _store
from gpuflow.clusters.reports import ReapItem
from gpuflow.clusters.where import _configured_region, _provisioner, command_hint, sandbox_in_effect
from gpuflow.config import gpuflow_home
from gpuflow.errors import ClusterNotFound, GpuflowError, StateError, UsageError
from gpuflow.provisioner import Provisioner, ProvisionerFactory
from gpuflow.state import StateStore, atomic_write_bytes, validate_name
from infra.tags import TAG_LAUNCH, TAG_OWNER, TAG_OWNER_ID

def _owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"[:255]


ENV_OWNER_ID = "GPUFLOW_OWNER_ID"
OWNER_ID_FILE = "owner-id"


def owner_id(home: Path | None = None) -> str:
    """Who "this gpuflow" is, for the ``gpuflow:owner-id`` tag that ``reap`` goes by.

    ``$GPUFLOW_OWNER_ID`` when set (CI jobs on fresh machines share one that way), else a
    random id made once per gpuflow home and kept in ``<home>/owner-id``: unlike
    user@host it survives a laptop's hostname changing with the network.
    """
    override = os.environ.get(ENV_OWNER_ID)
    if override:
        return validate_name(override, ENV_OWNER_ID)
    path = (home or gpuflow_home()) / OWNER_ID_FILE
    if not path.exists():
        # Create-if-absent atomically: the first of two racing processes wins, both read its id.
        temporary = path.with_name(f".{OWNER_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        atomic_write_bytes(temporary, f"gf-{secrets.token_hex(8)}\n".encode())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    value = path.read_text().strip()
    try:
        return validate_name(value, "owner id")
    except UsageError as exc:
        raise StateError(
            f"{path} is damaged ({value[:40]!r})",
            hint="delete it to make a new id; what the old id created then counts as another owner's for reap",
        ) from exc


OTHER_OWNER_REASON = "another gpuflow created it"


def _owned_cluster_resources(
    provisioner: Provisioner, name: str, *, launch_id: str | None = None, any_owner: bool = False
) -> tuple[list[Any], list[str], list[str], list[ReapItem]]:
    """What is tagged as cluster ``name`` where ``provisioner`` looks, split by whose it is:
    (live instance views, security group ids, key pair names) this gpuflow created — its
    :func:`owner_id`, or the ``up`` ``launch_id`` its record names — and the rest, another
    gpuflow's, as skipped items.  ``any_owner`` takes everything.  A name alone never says
    whose something is: two people may both call a cluster ``ml``."""
    mine = _mine(launch_id, any_owner)
    live: list[Any] = []
    groups: list[str] = []
    keys: list[str] = []
    skipped: list[ReapItem] = []
    for view in provisioner.find_instances(cluster=name):
        if mine(view.tags.get(TAG_OWNER_ID), view.tags.get(TAG_LAUNCH)):
            live.append(view)
        else:
            skipped.append(ReapItem(
                "instance", view.instance_id, provisioner.region, name, OTHER_OWNER_REASON, view.instance_type,
                view.tags.get(TAG_OWNER), view.tags.get(TAG_OWNER_ID),
            ))
    for resource in provisioner.cluster_resources(name):
        if mine(resource.owner_id, resource.launch_id):
            (groups if resource.kind == "security-group" else keys).append(resource.resource_id)
        else:
            skipped.append(ReapItem(
                resource.kind, resource.resource_id, provisioner.region, name, OTHER_OWNER_REASON, resource.detail,
                resource.owner, resource.owner_id,
            ))
    return live, groups, keys, skipped


def _mine(launch_id: str | None, any_owner: bool) -> Any:
    """``mine(owner id tag, launch id tag)``: whether this gpuflow created a resource
    (its owner id, or the ``up`` ``launch_id`` its record names); all with ``any_owner``."""
    me = owner_id()

    def mine(owner: str | None, launch: str | None) -> bool:
        return any_owner or owner == me or (launch_id is not None and launch == launch_id)

    return mine


def _owned_launch_templates(
    provisioner: Provisioner, name: str, *, launch_id: str | None = None, any_owner: bool = False
) -> tuple[list[Any], list[ReapItem]]:
    """The launch templates tagged as cluster ``name``'s where ``provisioner`` looks (a relaunch
    left them when deleting failed), split as :func:`_owned_cluster_resources` splits the rest."""
    mine = _mine(launch_id, any_owner)
    owned: list[Any] = []
    skipped: list[ReapItem] = []
    for resource in provisioner.find_launch_templates(name):
        if mine(resource.owner_id, resource.launch_id):
            owned.append(resource)
        else:
            skipped.append(ReapItem(
                resource.kind, resource.resource_id, provisioner.region, name, OTHER_OWNER_REASON, resource.detail,
                resource.owner, resource.owner_id,
            ))
    return owned, skipped


def whose(items: Iterable[Any]) -> str:
    """Who created these (ReapItems or InstanceViews): "user@host (owner id X)", for messages."""
    labels = set()
    for item in items:
        tags = getattr(item, "tags", None)
        owner, owner_tag = (tags.get(TAG_OWNER), tags.get(TAG_OWNER_ID)) if tags is not None else (item.owner, item.owner_id)
        identity = f"owner id {owner_tag}" if owner_tag else "no owner id"
        labels.add(f"{owner} ({identity})" if owner else identity)
    return ", ".join(sorted(labels)) or "unknown"


def _look_up_unrecorded(
    store: StateStore,
    name: str,
    tombstone: dict[str, Any] | None,
    any_owner: bool,
    in_sandbox: bool,
    provisioner_factory: ProvisionerFactory | None,
    project_dir: Path | None = None,
) -> tuple[Provisioner, str, list[Any], list[ReapItem]]:
    """A name without a live record, looked up by its tags where a tombstone of the same
    cloud says it was, else in the configured region of the cloud in effect: (provisioner,
    region, live instances this gpuflow created — all with ``any_owner`` —, another
    gpuflow's live instances)."""
    if tombstone is not None and bool(tombstone.get("sandbox")) == in_sandbox:  # downed here: look where it was
        region, profile = tombstone["region"], tombstone.get("profile")
    else:
        region, profile = _configured_region(project_dir), None
    provisioner = _provisioner(provisioner_factory, region, profile, in_sandbox)
    live, _groups, _keys, skipped = _owned_cluster_resources(provisioner, name, any_owner=any_owner)
    return provisioner, region, live, [item for item in skipped if item.kind == "instance"]


def _another_owners(name: str, region: str, others: list[ReapItem], *, hint: str) -> ClusterNotFound:
    return ClusterNotFound(
        f"no cluster of this gpuflow named {name!r}: the one in {region} belongs to another gpuflow ({whose(others)})",
        hint=hint,
    )


def explain_unknown(
    name: str, cause: ClusterNotFound, *, provisioner_factory: ProvisionerFactory | None = None,
    project_dir: Path | None = None,
) -> ClusterNotFound:
    """The error for ``ssh``/``run`` on a name this gpuflow has no live record of: says
    whose the cluster of that name is when its tags show one (neither command can reach
    it — the key and pinned host keys live with whoever launched it), else ``cause``."""
    store = _store()
    document = store.get(name)
    if _live(document):
        return cause
    try:
        in_sandbox = sandbox_in_effect(project_dir=project_dir)
        _provisioner_used, region, live, others = _look_up_unrecorded(
            store, name, document, False, in_sandbox, provisioner_factory, project_dir
        )
    except GpuflowError:
        return cause  # no account to ask, or it refused: the plain "not found" stands
    if live:
        return ClusterNotFound(
            f"cluster {name!r} runs in {region}, launched by this gpuflow elsewhere, but it has no record here "
            "(no key, no pinned host keys): it cannot be reached from here",
            hint=f"use the machine that launched it, or end it with {command_hint(f'down {name} --region {region}', in_sandbox)}",
        )
    if others:
        return _another_owners(name, region, others, hint="only its owner has its key; pick another name for yours")
    return cause
