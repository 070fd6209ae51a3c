"""Relaunch: replace a cluster's interrupted node(s) with new instances (``run --recover``).

Every node of the cluster is replaced (its spec's ``count``; jobs run on the first): the
interrupted ones are gone, and the others are terminated first, so a relaunched cluster is
never billed twice nor left half in one zone and half in another.

The replacement is launched in the order a person who trains on spot every day
would try by hand (:func:`launch_order`): the same instance type in the *other*
zones first (the interrupted zone last: its capacity just went), then each
fallback type over every zone, then — only with the cluster's ``spot_fallback``
— on-demand over types x zones.  Those candidates become a few EC2 Fleet calls
(CreateFleet type ``instant``, :func:`launch_steps`): for spot, one over the same
type in the other zones, then one over the interrupted zone and every fallback type
x zone, EC2 choosing by ``price-capacity-optimized``; for on-demand, one over every
type x zone, EC2 taking them in that order (``prioritized``).  No capacity in a
call moves on to the next at once.  The fleet launches from a launch template
with exactly ``up``'s settings (:func:`infra.aws.instance.launch_settings`), made
for this relaunch, tagged like the cluster's other resources and deleted right
after its fleet calls, whatever happened (``down`` and ``reap`` delete one a
failed deletion left).

The new instance carries the cluster's tags with the launch id of its ``up``,
so ``down`` and ``reap`` find it exactly as they find the first one; the
record lists it as the cluster's node as soon as EC2 answers, and every
replaced node under ``replaced_nodes``.  Any failure or Ctrl-C before the new
node is ready terminates it (waited for) before the error propagates.
"""

from __future__ import annotations

import contextlib
import datetime
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from dataclasses import dataclass, replace

from gpuflow.clusters.owner import _owner, owner_id
from gpuflow.clusters.record import Phase, _iso, _now, _save, _store, phase_of
from gpuflow.clusters.reconcile import _price_per_instance
from gpuflow.clusters.reports import Progress
from gpuflow.clusters.where import _provisioner
from gpuflow.config import gpuflow_home
from gpuflow.errors import CapacityError, ClusterNotFound, GpuflowError
from gpuflow.provisioner import ProvisionerFactory
from gpuflow.records import Cluster, Node
from gpuflow.transport import openssh
from infra.dlami import DLAMI_SSH_USER
from infra.records import FleetPool, FleetStep, ImageInfo, LaunchRequest, LaunchResult, LaunchTemplateRef
from infra.tags import TAG_CLUSTER, TAG_CREATED_AT, TAG_EXPIRES_AT, TAG_LAUNCH, TAG_MANAGED, TAG_OWNER, TAG_OWNER_ID
from infra.userdata import render_user_data

GONE_STATES = ("shutting-down", "terminated")
REPLACED_NODES = "replaced_nodes"  # the cluster record's list of every node a relaunch replaced


@dataclass(frozen=True)
class Candidate:
    """One launch to try: a type, the zones in order, a market."""

    instance_type: str
    zones: tuple[str, ...]
    market: str  # "spot" | "on-demand"

    def __str__(self) -> str:
        return f"{self.instance_type} ({self.market}) in {', '.join(self.zones)}"


@dataclass(frozen=True)
class Replacement:
    """What a relaunch made: the cluster as now recorded, and the new head node's facts."""

    cluster: Cluster
    instance_id: str
    instance_type: str
    availability_zone: str
    market: str
    price_per_hour: float | None
    failed_attempts: tuple[str, ...] = ()


def launch_order(
    instance_type: str,
    fallback_types: Sequence[str],
    zones_of: dict[str, Sequence[str]],
    *,
    spot: bool,
    spot_fallback: bool,
    avoid_zone: str | None,
) -> list[Candidate]:
    """The candidates in the order they are tried (see the module's docstring)."""
    types = list(dict.fromkeys([instance_type, *fallback_types]))

    def ordered(kind: str) -> tuple[str, ...]:
        zones = list(zones_of.get(kind, ()))
        return tuple([zone for zone in zones if zone != avoid_zone] + [zone for zone in zones if zone == avoid_zone])

    markets = (["spot", "on-demand"] if spot_fallback else ["spot"]) if spot else ["on-demand"]
    return [Candidate(kind, ordered(kind), market) for market in markets for kind in types if ordered(kind)]


def launch_steps(
    candidates: Sequence[Candidate], pools_of: Callable[[Candidate], Sequence[tuple[str, str]]], *, avoid_zone: str | None
) -> list[FleetStep]:
    """The EC2 Fleet calls that try ``candidates`` in their order (see the module's docstring);
    ``pools_of(candidate)`` is its (subnet id, zone) pairs in its zones' order."""
    steps: list[FleetStep] = []
    for market in dict.fromkeys(candidate.market for candidate in candidates):
        of_market = [candidate for candidate in candidates if candidate.market == market]
        pools = [
            FleetPool(candidate.instance_type, subnet_id, zone)
            for candidate in of_market for subnet_id, zone in pools_of(candidate)
        ]
        if market == "spot":  # the same type elsewhere first, then EC2 picks among all the rest
            first = [pool for pool in pools if pool.instance_type == of_market[0].instance_type
                     and pool.availability_zone != avoid_zone]
            groups = [first, [pool for pool in pools if pool not in first]]
        else:  # prioritized: EC2 takes the pools in this order
            groups = [pools]
        steps += [FleetStep(market, tuple(group)) for group in groups if group]
    return steps


def relaunch(
    cluster_name: str,
    *,
    fallback_types: Sequence[str] = (),
    avoid_zone: str | None = None,
    progress: Progress | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
) -> Replacement:
    """Replace cluster ``cluster_name``'s head node (gone, or going) with a new instance and
    wait until it passes its status checks; return it.  :class:`CapacityError` when no
    candidate had capacity (nothing was left running)."""
    report = progress or (lambda message: None)
    store = _store()
    document = store.get(cluster_name)
    if document is None or phase_of(document) is not Phase.UP:
        raise ClusterNotFound(f"no cluster {cluster_name!r} is up to relaunch a node in")
    cluster = Cluster.from_dict(document)
    launch_id = document.get("launch_id")
    spec = cluster.spec
    if spec is None or not cluster.security_group_id or not cluster.key_name:
        raise ClusterNotFound(f"cluster {cluster_name!r} was not made by `gpuflow up`: its node cannot be relaunched")
    provisioner = _provisioner(provisioner_factory, cluster.region, cluster.profile, cluster.sandbox)
    # The interrupted node goes first (a spot notice gives it two minutes anyway): never two bills.
    live_old = [
        view.instance_id for view in provisioner.describe_instances([node.instance_id for node in cluster.nodes])
        if view.state not in GONE_STATES
    ]
    if live_old:
        report(f"terminating the interrupted node {', '.join(live_old)}")
        provisioner.terminate(live_old)
        provisioner.wait_until(live_old, "terminated")
    openssh.close_masters(str(gpuflow_home()), cluster.name)  # `gpuflow ssh`'s shared connections to the old nodes
    types = list(dict.fromkeys([cluster.instance_type, *fallback_types]))
    zones_of = {kind: provisioner.offered_zones(kind) for kind in types}
    candidates = launch_order(
        cluster.instance_type, fallback_types, zones_of, spot=spec.spot, spot_fallback=spec.spot_fallback,
        avoid_zone=avoid_zone,
    )
    image = ImageInfo(cluster.ami, cluster.ami_name or "", "/dev/sda1", "explicit")
    with contextlib.suppress(GpuflowError):
        image = provisioner.resolve_image(cluster.ami)  # its root device name
    now = _now()
    tags = {
        TAG_CLUSTER: cluster.name,
        TAG_OWNER: _owner(),
        TAG_OWNER_ID: owner_id(),
        TAG_CREATED_AT: cluster.created_at or _iso(now),
        TAG_EXPIRES_AT: _iso(now + datetime.timedelta(hours=spec.max_hours)),
        TAG_MANAGED: "true",
        TAG_LAUNCH: launch_id or "",
    }
    user_data = render_user_data(
        cluster_name=cluster.name, idle_minutes=spec.idle_minutes, max_hours=spec.max_hours, ssh_user=DLAMI_SSH_USER
    )
    vpc_id = provisioner.default_vpc()
    short_id = uuid.uuid4().hex[:8]
    token_id = f"{launch_id}-relaunch-{short_id}"  # its own idempotency tokens, the up's tag
    request = LaunchRequest(
        cluster_name=cluster.name, launch_id=token_id, instance_type=cluster.instance_type, image=image,
        count=max(1, spec.count), key_name=cluster.key_name, security_group_id=cluster.security_group_id, subnets=(),
        disk_gb=spec.disk_gb, user_data=user_data, tags=tags, spot=spec.spot,
        instance_profile_arn=cluster.instance_profile_arn,  # its runs stay durable: the role `up` gave
    )
    steps = launch_steps(
        candidates, lambda candidate: provisioner.launch_subnets(vpc_id, candidate.zones), avoid_zone=avoid_zone
    )
    failures: list[str] = []
    result: LaunchResult | None = None
    templates: dict[str, LaunchTemplateRef] = {}
    try:
        for step in steps:
            if step.market not in templates:
                name = f"gpuflow-{cluster.name}-{short_id}" + ("" if step.market == "spot" else "-od")
                templates[step.market] = provisioner.create_launch_template(
                    name, request, step.market, {**tags, TAG_CREATED_AT: _iso(_now())}  # its own age, for reap
                )
            try:
                result = provisioner.launch_fleet(templates[step.market], step, request, on_attempt=report)
            except CapacityError as exc:
                failures.append(exc.message)
                continue
            failures.extend(result.failed_attempts)
            break
    except BaseException:
        _delete_templates(provisioner, templates.values(), report)
        raise
    if result is None:
        _delete_templates(provisioner, templates.values(), report)
        raise CapacityError(
            f"no capacity to relaunch a node of {cluster.name}: {'; '.join(failures) or 'no zone offers its types'}",
            hint="add --fallback-types, or --spot-fallback to allow on-demand",
        )
    chosen_type = result.instance_type or cluster.instance_type
    ids = list(result.instance_ids)
    replaced = [*document.get(REPLACED_NODES, []), *(node.to_dict() for node in cluster.nodes)]
    pending = replace(cluster, nodes=tuple(Node(instance_id, "pending") for instance_id in ids))
    _save(store, pending, Phase.UP, launch_id, **{REPLACED_NODES: replaced})
    try:
        _delete_templates(provisioner, templates.values(), report)  # the node is launched: its template has done
        provisioner.wait_until(ids, "running", on_progress=lambda text: report(f"waiting: {text}"))
        views = provisioner.wait_until(ids, "ok", on_progress=lambda text: report(f"waiting: {text}"))
        price, _source = _price_per_instance(provisioner, chosen_type, result.market, result.availability_zone)
    except BaseException:
        report(f"relaunch failed: terminating {', '.join(ids)}")
        with contextlib.suppress(GpuflowError):
            provisioner.terminate(ids)
            provisioner.wait_until(ids, "terminated")
        raise
    ready = replace(
        pending, nodes=tuple(view.to_node() for view in views), price_per_hour=price, instance_type=chosen_type
    )
    _save(store, ready, Phase.UP, launch_id, **{REPLACED_NODES: replaced})
    return Replacement(
        ready, ids[0], chosen_type, result.availability_zone, result.market, price, tuple(failures)
    )


def _delete_templates(provisioner: Any, templates: Iterable[LaunchTemplateRef], report: Progress) -> None:
    """Delete this relaunch's launch templates; one that cannot be is reported, never fatal:
    its tags let ``down`` and ``reap`` delete it later."""
    for template in templates:
        try:
            provisioner.delete_launch_template(template.template_id)
        except GpuflowError as exc:
            report(f"could not delete launch template {template.name} ({exc.message}); "
                   "`gpuflow down` or `gpuflow reap` deletes it")
