"""Reap: find what gpuflow tagged that no live cluster owns (this gpuflow's, unless told otherwise) and delete it."""

from __future__ import annotations

import datetime
import socket
from typing import Any

from pathlib import Path
from gpuflow.clusters.owner import owner_id
from gpuflow.clusters.record import Phase, _iso, _live, _now, _parse_iso, _store, _write, key_file_path, phase_of
from gpuflow.clusters.reports import Progress, ReapItem, ReapReport
from gpuflow.clusters.where import _configured_region, _provisioner, command_hint, sandbox_in_effect
from gpuflow.config import gpuflow_home
from gpuflow.errors import UsageError
from gpuflow.provisioner import Provisioner, ProvisionerFactory
from gpuflow.records import Cluster
from gpuflow.state import process_alive, validate_name
from gpuflow.transport import openssh

# `reap --expired` waits this long past gpuflow:expires-at: the dead-man's switch counts
# --max-hours from the instance's boot, which comes minutes after the tag's created-at.
EXPIRY_GRACE = datetime.timedelta(hours=1)
# A relaunch's launch template lives for its few fleet calls (seconds); one older than this is
# left over even while its cluster is live (deleting it failed), and is reaped.
LAUNCH_TEMPLATE_GRACE = datetime.timedelta(minutes=15)


def reap(
    *,
    yes: bool = False,
    region: str | None = None,
    sandbox: bool | None = None,
    any_owner: bool = False,
    owner_prefix: str | None = None,
    expired_only: bool = False,
    progress: Progress | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
    project_dir: Path | None = None,
) -> ReapReport:
    """Find everything tagged ``gpuflow:managed`` that no live cluster owns —
    instances of clusters the local state does not know, and the security
    groups, key pairs, unattached volumes and open spot requests of clusters
    that are gone, and launch templates a relaunch left (past
    :data:`LAUNCH_TEMPLATE_GRACE`, even of a live cluster) — and, with ``yes``, delete it.  Without ``yes`` nothing is
    deleted (a dry run).  Scans ``region`` (default: the configured one) and
    the regions of the local clusters; the sandbox cloud instead of AWS where
    the sandbox is in effect (``sandbox``, else the project config).

    Only what this gpuflow created (its :func:`owner_id` in ``gpuflow:owner-id``)
    is reaped: in a shared account another person's clusters are unknown here but
    not orphans.  The rest is reported as skipped; ``any_owner`` reaps it too.

    For CI (README, "Clusters in CI"): ``owner_prefix`` narrows ``any_owner`` (which it
    needs) to the owner ids that start with it (every job of one pipeline run, once they
    have all finished); ``expired_only`` takes only what is past its ``gpuflow:expires-at``
    (created-at + ``--max-hours``), whose job cannot be running any more."""
    report = progress or (lambda message: None)
    sandbox = sandbox_in_effect(sandbox, project_dir=project_dir)
    if owner_prefix is not None:
        validate_name(owner_prefix, "owner prefix")
        if not any_owner:
            raise UsageError(
                "--owner-prefix narrows --any-owner (other owners' resources are taken only when you say so)",
                hint=command_hint(f"reap --any-owner --owner-prefix {owner_prefix}", sandbox),
            )
    me = owner_id()
    now = _now()
    skipped: list[ReapItem] = []
    unexpired: list[ReapItem] = []
    store = _store()
    documents = {name: doc for name, doc in store.all().items() if _live(doc)}
    regions = {region or _configured_region(project_dir)} | {
        doc["region"] for doc in documents.values() if bool(doc.get("sandbox")) == sandbox
    }
    items: list[ReapItem] = []
    plans: list[tuple[Provisioner, list[Any], str]] = []
    for scan_region in sorted(regions):
        provisioner = _provisioner(provisioner_factory, scan_region, None, sandbox)
        report(f"scanning {scan_region}")
        resources = provisioner.managed_resources()
        live_by_cluster: dict[str, int] = {}
        live_launches: set[tuple[str | None, str | None]] = set()
        for resource in resources:
            if resource.kind == "instance" and resource.cluster:
                live_by_cluster[resource.cluster] = live_by_cluster.get(resource.cluster, 0) + 1
                live_launches.add((resource.cluster, resource.launch_id))
        owned = set()
        for name, document in documents.items():
            if document["region"] != scan_region or bool(document.get("sandbox")) != sandbox:
                continue
            creating_alive = (
                phase_of(document) is Phase.CREATING
                and document.get("host") == socket.gethostname()
                and process_alive(document.get("pid"))
            )
            # Live means live instances of *this record's* `up`: another owner's cluster that took
            # the name after ours ended does not keep our leftovers from being reaped.
            if creating_alive or (phase_of(document) is Phase.UP and (name, document.get("launch_id")) in live_launches):
                owned.add(name)
        orphans, others = [], []
        for resource in resources:
            if resource.cluster in {record.name for record in store.damaged}:
                continue  # a damaged record's cluster is left to `gpuflow down NAME` (warned above)
            if resource.cluster in owned and not _stale_launch_template(resource, now):
                continue
            if resource.cluster in owned:
                reason = "a relaunch's launch template left behind"
            elif resource.kind == "instance":
                reason = "instance of a cluster gpuflow does not know here"
            elif resource.cluster in live_by_cluster:
                reason = "belongs to a cluster gpuflow does not know here"
            else:
                reason = "its cluster has no live instances"
            item = ReapItem(
                resource.kind, resource.resource_id, scan_region, resource.cluster, reason,
                resource.detail, resource.owner, resource.owner_id,
            )
            mine = (any_owner or resource.owner_id == me) and (
                owner_prefix is None or (resource.owner_id or "").startswith(owner_prefix)
            )
            expires_at = _parse_iso(resource.expires_at)
            if mine and expired_only and (expires_at is None or expires_at + EXPIRY_GRACE > now):
                unexpired.append(item)
                continue
            (orphans if mine else others).append(resource)
            (items if mine else skipped).append(item)
        plans.append((provisioner, orphans, scan_region))
    if not yes:
        return ReapReport(
            tuple(items), deleted=False, regions=tuple(sorted(regions)), skipped=tuple(skipped), unexpired=tuple(unexpired)
        )

    reaped_clusters: set[str] = set()
    reaped_key_clusters: set[str] = set()
    for provisioner, orphans, scan_region in plans:
        by_kind: dict[str, list[Any]] = {}
        for resource in orphans:
            by_kind.setdefault(resource.kind, []).append(resource)
            if resource.cluster and resource.kind != "launch-template":  # a live cluster's template: it stays live
                reaped_clusters.add(resource.cluster)
                if resource.kind == "key-pair":
                    reaped_key_clusters.add(resource.cluster)
        provisioner.cancel_spot_requests([r.resource_id for r in by_kind.get("spot-request", [])])
        instance_ids = [r.resource_id for r in by_kind.get("instance", [])]
        if instance_ids:
            report(f"{scan_region}: terminating {len(instance_ids)} instance(s)")
            provisioner.terminate(instance_ids)
            provisioner.wait_until(instance_ids, "terminated")
        for resource in by_kind.get("volume", []):
            provisioner.delete_volume(resource.resource_id)
        for resource in by_kind.get("security-group", []):
            report(f"{scan_region}: deleting security group {resource.resource_id}")
            provisioner.delete_security_group(resource.resource_id)
        for resource in by_kind.get("key-pair", []):
            provisioner.delete_key_pair(resource.resource_id)
        for resource in by_kind.get("launch-template", []):
            report(f"{scan_region}: deleting launch template {resource.detail or resource.resource_id}")
            provisioner.delete_launch_template(resource.resource_id)
    for name in sorted(reaped_clusters):  # `gpuflow ssh`'s shared connections to nodes now gone
        openssh.close_masters(str(gpuflow_home()), name)
    with store.locked():
        for name in sorted(reaped_clusters):
            if not _is_valid_name(name):  # a tag value gpuflow did not write: no local file can match it
                continue
            document = store.get(name)
            if not _live(document):
                if name in reaped_key_clusters:
                    key_file_path(name).unlink(missing_ok=True)  # its key pair is gone: the private key is useless
                continue
            _write(store, Cluster.from_dict(document), Phase.DELETED, document.get("launch_id"), deleted_at=_iso(_now()), reaped=True)
            key_file_path(name).unlink(missing_ok=True)
    return ReapReport(
        tuple(items), deleted=True, regions=tuple(sorted(regions)), skipped=tuple(skipped), unexpired=tuple(unexpired)
    )


def _stale_launch_template(resource: Any, now: datetime.datetime) -> bool:
    """A launch template past :data:`LAUNCH_TEMPLATE_GRACE` (or with no created-at tag):
    no relaunch is still using it."""
    if resource.kind != "launch-template":
        return False
    created = _parse_iso(resource.created_at)
    return created is None or created + LAUNCH_TEMPLATE_GRACE <= now


def _is_valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except UsageError:
        return False
    return True
