"""Status and ls: a cluster's record reconciled with what the cloud reports, with its price and cost so far."""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from pathlib import Path
from gpuflow.clusters.owner import _another_owners, _look_up_unrecorded
from gpuflow.clusters.record import Phase, _live, _now, _parse_iso, _store, phase_of, resolve_cluster_name
from gpuflow.clusters.reports import ClusterListing, ClusterState, ClusterStatus, UncheckedPlace
from gpuflow.clusters.where import (
    _configured_region,
    _provisioner,
    _refuse_aws_record_in_sandbox,
    command_hint,
    sandbox_in_effect,
)
from gpuflow.errors import CloudError, ClusterNotFound, CredentialsError, GpuflowError
from gpuflow.provisioner import Provisioner, ProvisionerFactory
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore, process_alive
from infra.tags import TAG_CREATED_AT, TAG_LAUNCH

def _cluster_views(provisioner: Provisioner, name: str, launch_id: str | None) -> list[Any]:
    """All instances (any state) of cluster ``name``, of its latest ``up`` when known."""
    views = provisioner.find_instances(cluster=name, states=())
    if launch_id:
        views = [view for view in views if view.tags.get(TAG_LAUNCH) == launch_id]
    return views


def _summarise(nodes: Iterable[Node]) -> ClusterState:
    states = [node.state for node in nodes]
    if not states or all(state in ("terminated", "shutting-down", "not-found") for state in states):
        return ClusterState.GONE
    if all(state == "running" for state in states):
        return ClusterState.RUNNING
    if all(state in ("pending", "running") for state in states):
        return ClusterState.PENDING
    if all(state in ("stopped", "stopping") for state in states):
        return ClusterState.STOPPED
    return ClusterState.PARTIAL


def _price_per_instance(provisioner: Provisioner, instance_type: str, market: str, zone: str | None) -> tuple[float | None, str]:
    from infra.aws.pricing import load_price_table

    if market == "spot":
        with contextlib.suppress(GpuflowError):
            spot = provisioner.spot_price(instance_type, zone)
            if spot is not None:
                return spot, "spot price history"
    table = load_price_table()
    price = table.on_demand_price(instance_type)
    if price is None:
        return None, "not in the price table"
    return price, f"on-demand list price ({table.region}, {table.as_of})"


def _status_from(cluster: Cluster, state: ClusterState, *, known: bool, price_source: str = "", now: datetime.datetime | None = None) -> ClusterStatus:
    now = now or _now()
    live = [node for node in cluster.nodes if node.state in ("pending", "running")]
    starts = [moment for moment in (_parse_iso(node.launch_time) for node in cluster.nodes) if moment]
    start = min(starts) if starts else _parse_iso(cluster.created_at)
    uptime = max(0.0, (now - start).total_seconds()) if (start and live) else 0.0
    per_hour = cluster.price_per_hour * len(live) if cluster.price_per_hour is not None else None
    cost = cluster.price_per_hour * len(live) * uptime / 3600.0 if cluster.price_per_hour is not None else None
    return ClusterStatus(cluster, state, known, uptime, per_hour, cost, price_source)


def status(
    name: str | None = None,
    *,
    sandbox: bool | None = None,
    any_owner: bool = False,
    provisioner_factory: ProvisionerFactory | None = None,
    project_dir: Path | None = None,
) -> ClusterStatus:
    """Cluster ``name`` reconciled with EC2 (the cache is updated): an
    instance terminated outside gpuflow shows as gone.  A name without a local
    record is looked up by its tags in the configured region: this gpuflow's
    instances show as ``unmanaged``; another gpuflow's are a ClusterNotFound
    saying whose, and shown only with ``any_owner``."""
    cluster_name = resolve_cluster_name(name, project_dir=project_dir)
    in_sandbox = sandbox_in_effect(sandbox, project_dir=project_dir)
    store = _store()
    document = store.get(cluster_name)
    if not _live(document):
        return _unrecorded_status(store, cluster_name, document, any_owner, in_sandbox, provisioner_factory, project_dir)
    cluster = Cluster.from_dict(document)
    _refuse_aws_record_in_sandbox(cluster, in_sandbox, "status")
    provisioner = _provisioner(provisioner_factory, cluster.region, cluster.profile, cluster.sandbox)
    return _reconcile(store, provisioner, cluster, document)


def _unrecorded_status(
    store: StateStore,
    name: str,
    tombstone: dict[str, Any] | None,
    any_owner: bool,
    in_sandbox: bool,
    provisioner_factory: ProvisionerFactory | None,
    project_dir: Path | None = None,
) -> ClusterStatus:
    provisioner, region, live, others = _look_up_unrecorded(
        store, name, tombstone, any_owner, in_sandbox, provisioner_factory, project_dir
    )
    if live:
        return _unmanaged_status(provisioner, region, name, live)
    if others:
        raise _another_owners(name, region, others, hint=f"{command_hint(f'status {name} --any-owner', in_sandbox)} shows it")
    raise ClusterNotFound(f"no cluster named {name!r}", hint=f"see {command_hint('ls', in_sandbox)}")


def _reconcile(store: StateStore, provisioner: Provisioner, cluster: Cluster, document: dict[str, Any], views: list[Any] | None = None) -> ClusterStatus:
    launch_id = document.get("launch_id")
    if views is None:
        views = _cluster_views(provisioner, cluster.name, launch_id)
    by_id = {view.instance_id: view for view in views}
    known_ids = [node.instance_id for node in cluster.nodes]
    nodes = [by_id[i].to_node() if i in by_id else Node(i, "not-found") for i in known_ids]
    nodes += [view.to_node() for view in views if view.instance_id not in known_ids]
    cluster = replace(cluster, nodes=tuple(nodes))
    phase = phase_of(document)
    if phase is Phase.CREATING:
        in_progress = document.get("host") == socket.gethostname() and process_alive(document.get("pid"))
        state = ClusterState.CREATING if in_progress else ClusterState.INTERRUPTED  # a crashed `up`: `down` finishes it
    else:
        state = _summarise(cluster.nodes)
    with store.locked():
        current = store.get(cluster.name)
        if current is not None and current.get("launch_id") == launch_id and phase_of(current) is phase:
            current.update(nodes=[node.to_dict() for node in cluster.nodes])
            store.put(cluster.name, current)
    source = ""
    if cluster.price_per_hour is not None:
        source = "spot price history" if any(node.lifecycle == "spot" for node in cluster.nodes) else "on-demand list price"
    return _status_from(cluster, state, known=True, price_source=source)


def list_clusters(
    *, region: str | None = None, sandbox: bool | None = None, provisioner_factory: ProvisionerFactory | None = None,
    project_dir: Path | None = None,
) -> ClusterListing:
    """Every cluster gpuflow knows locally, reconciled, plus clusters EC2 has
    tagged instances of that the local state does not know (state
    ``unmanaged``; ``reap`` removes them).  Scans ``region`` (default: the
    configured one) and the regions of the local clusters.  Where the sandbox
    is in effect the stray scan is of the sandbox cloud, and AWS clusters known
    here are listed as ``unchecked``, without asking AWS.  A place that cannot
    be asked (no usable credentials, the cloud unreachable or failing) does not
    hide the others: its recorded clusters are listed as ``unchecked`` and the
    listing names it (:class:`ClusterListing`)."""
    store = _store()
    documents = {name: doc for name, doc in store.all().items() if _live(doc)}
    scan_region = region or _configured_region(project_dir)
    scan_sandbox = sandbox_in_effect(sandbox, project_dir=project_dir)
    groups: dict[tuple[str, str | None, bool], list[str]] = {(scan_region, None, scan_sandbox): []}
    unchecked: list[ClusterStatus] = []
    for name, document in documents.items():
        if scan_sandbox and not document.get("sandbox"):
            unchecked.append(_status_from(Cluster.from_dict(document), ClusterState.UNCHECKED, known=True))
            continue
        key = (document["region"], document.get("profile"), bool(document.get("sandbox")))
        groups.setdefault(key, []).append(name)
    results: list[ClusterStatus] = []
    unchecked_places: list[UncheckedPlace] = []
    checked = 0
    strays_seen: set[tuple[str, str]] = set()  # one in-process mock can back two groups
    for (group_region, profile, group_sandbox), names in sorted(groups.items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][2])):
        try:
            provisioner = _provisioner(provisioner_factory, group_region, profile, group_sandbox)
            views = provisioner.find_instances(states=())
        except (CredentialsError, CloudError) as exc:
            unchecked_places.append(UncheckedPlace(group_region, profile, group_sandbox, exc, tuple(sorted(names))))
            results += [
                _status_from(Cluster.from_dict(documents[name]), ClusterState.UNCHECKED, known=True) for name in names
            ]
            continue
        checked += 1
        by_cluster: dict[str, list[Any]] = {}
        for view in views:
            if view.cluster:
                by_cluster.setdefault(view.cluster, []).append(view)
        for name in names:
            document = documents[name]
            launch_id = document.get("launch_id")
            mine = [view for view in by_cluster.get(name, []) if not launch_id or view.tags.get(TAG_LAUNCH) == launch_id]
            results.append(_reconcile(store, provisioner, Cluster.from_dict(document), document, mine))
        for cluster_name, cluster_views in sorted(by_cluster.items()):
            if cluster_name in documents or cluster_name in {record.name for record in store.damaged} or (group_region, cluster_name) in strays_seen:
                continue
            strays_seen.add((group_region, cluster_name))
            live = [view for view in cluster_views if view.state in ("pending", "running", "stopping", "stopped")]
            if not live:
                continue
            results.append(_unmanaged_status(provisioner, group_region, cluster_name, live, group_sandbox))
    return ClusterListing(
        statuses=tuple(results + unchecked),
        unchecked_places=tuple(unchecked_places),
        checked_places=checked,
        aws_left_to_sandbox=bool(unchecked),
    )


def _unmanaged_status(provisioner: Provisioner, region: str, name: str, views: list[Any], sandbox: bool = False) -> ClusterStatus:
    instance_type = views[0].instance_type
    market = "spot" if any(view.lifecycle == "spot" for view in views) else "on-demand"
    price, source = _price_per_instance(provisioner, instance_type, market, views[0].availability_zone)
    cluster = Cluster(
        name=name,
        region=region,
        instance_type=instance_type,
        ami="",
        nodes=tuple(view.to_node() for view in views),
        created_at=views[0].tags.get(TAG_CREATED_AT),
        price_per_hour=price,
        sandbox=sandbox,
    )
    return _status_from(cluster, ClusterState.UNMANAGED, known=False, price_source=source)
