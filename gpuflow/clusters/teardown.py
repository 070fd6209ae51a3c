"""Down: tear a cluster down (this gpuflow's resources only), leave a tombstone, report run time and cost."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pathlib import Path
from gpuflow.clusters.owner import _owned_cluster_resources, _owned_launch_templates, whose
from gpuflow.clusters.record import (
    Phase,
    _iso,
    _live,
    _now,
    _parse_iso,
    _recorded,
    _recorded_region,
    _store,
    _write,
    key_file_path,
    phase_of,
    resolve_cluster_name,
)
from gpuflow.clusters.reports import DownReport, Progress
from gpuflow.clusters.where import (
    _configured_region,
    _provisioner,
    _refuse_aws_record_in_sandbox,
    command_hint,
    sandbox_in_effect,
)
from gpuflow.config import gpuflow_home
from gpuflow.errors import ClusterNotFound, DamagedRecord
from gpuflow.provisioner import ProvisionerFactory
from gpuflow.records import Cluster
from gpuflow.transport import openssh

def down(
    name: str | None = None,
    *,
    region: str | None = None,
    sandbox: bool | None = None,
    any_owner: bool = False,
    progress: Progress | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
    project_dir: Path | None = None,
) -> DownReport:
    """Terminate cluster ``name``, wait until terminated, delete the security
    group and key pair gpuflow created for it (never the user's own), and
    report run time and estimated cost.  Idempotent: a second ``down``, or the
    ``down`` of a half-created cluster, succeeds.  Without a local record the
    cluster is found by its tags in ``region``, in the sandbox cloud where the
    sandbox is in effect (:func:`sandbox_in_effect`).

    Only what this gpuflow created is touched (its owner id, or the launch id of
    its record): what another gpuflow tagged with the same name is left alone and
    reported in ``skipped``; without a record and with nothing of ours, that is a
    ClusterNotFound naming the owner.  ``any_owner`` takes everything."""
    report = progress or (lambda message: None)
    cluster_name = resolve_cluster_name(name, project_dir=project_dir)
    in_sandbox = sandbox_in_effect(sandbox, project_dir=project_dir)
    store = _store()
    damaged: DamagedRecord | None = None
    try:
        document = store.get(cluster_name)
    except DamagedRecord as exc:  # torn down from its AWS tags, where it says it ran if that is readable
        document, damaged = None, exc
    if document is not None and in_sandbox and not document.get("sandbox"):
        _refuse_aws_record_in_sandbox(Cluster.from_dict(document), in_sandbox, "down")
    if damaged is not None:
        recorded_sandbox = _recorded(damaged.raw, "sandbox", bool)
        cluster = Cluster(
            name=cluster_name,
            region=region or _recorded_region(damaged.raw) or _configured_region(project_dir),
            instance_type="",
            ami="",
            profile=_recorded(damaged.raw, "profile", str),
            sandbox=in_sandbox if recorded_sandbox is None else recorded_sandbox,
        )
        _refuse_aws_record_in_sandbox(cluster, in_sandbox, "down")
        provisioner = _provisioner(provisioner_factory, cluster.region, cluster.profile, cluster.sandbox)
        launch_id = None
        scope_launch_id = _recorded(damaged.raw, "launch_id", str)  # its own `up`'s resources, if still readable
    elif document is not None and phase_of(document) is Phase.DELETED:
        tombstone = Cluster.from_dict(document)
        provisioner = _provisioner(provisioner_factory, tombstone.region, tombstone.profile, tombstone.sandbox)
        leftovers, groups, keys, skipped = _owned_cluster_resources(
            provisioner, cluster_name, launch_id=document.get("launch_id"), any_owner=any_owner
        )
        if not (leftovers or groups or keys):
            return DownReport(
                cluster_name, already_down=True, estimated_cost=document.get("final_cost"), skipped=tuple(skipped)
            )
        # Something of ours reappeared under the name (another machine?): clean it by its tags, where the cluster was.
        scope_launch_id = document.get("launch_id")
        document = None
        cluster = Cluster(
            name=cluster_name,
            region=tombstone.region,
            instance_type=tombstone.instance_type,
            ami="",
            profile=tombstone.profile,
            sandbox=tombstone.sandbox,
        )
        launch_id = None
    elif document is None:
        cluster = Cluster(name=cluster_name, region=region or _configured_region(project_dir), instance_type="", ami="", sandbox=in_sandbox)
        provisioner = _provisioner(provisioner_factory, cluster.region, None, in_sandbox)
        launch_id = scope_launch_id = None
    else:
        cluster = Cluster.from_dict(document)
        provisioner = _provisioner(provisioner_factory, cluster.region, cluster.profile, cluster.sandbox)
        launch_id = scope_launch_id = document.get("launch_id")

    report(f"finding the resources of {cluster_name}")
    live, groups, keys, skipped = _owned_cluster_resources(
        provisioner, cluster_name, launch_id=scope_launch_id, any_owner=any_owner
    )
    if damaged is not None and not (live or groups or keys):
        others = f"; what carries its name there belongs to another gpuflow ({whose(skipped)})" if skipped else ""
        raise ClusterNotFound(
            f"no cluster named {cluster_name!r} in {cluster.region}, and its state record {damaged.path} is damaged{others}",
            hint=f"if it ran in another region pass --region; if it is gone, remove {damaged.path}",
        )
    if document is None and not (live or groups or keys):
        if skipped:
            raise ClusterNotFound(
                f"cluster {cluster_name!r} in {cluster.region} belongs to another gpuflow ({whose(skipped)}); "
                "this one created none of it and leaves it alone",
                hint=(
                    "only if you are sure its owner is done with it: "
                    + command_hint(f"down {cluster_name} --region {cluster.region} --any-owner", cluster.sandbox)
                ),
            )
        raise ClusterNotFound(
            f"no cluster named {cluster_name!r} in {cluster.region}",
            hint=f"see {command_hint('ls', in_sandbox)}, or pass --region",
        )
    instance_ids = sorted({view.instance_id for view in live} | {node.instance_id for node in cluster.nodes if node.state != "terminated"})
    openssh.close_masters(str(gpuflow_home()), cluster_name)  # `gpuflow ssh`'s shared connections to its nodes
    spot_requests = sorted({view.spot_request_id for view in live if view.spot_request_id})
    provisioner.cancel_spot_requests(spot_requests)
    terminated: list[str] = []
    final_views: list[Any] = []
    if instance_ids:
        report(f"terminating {len(instance_ids)} instance(s)")
        before = provisioner.describe_instances(instance_ids)
        provisioner.terminate(instance_ids)
        terminated = [view.instance_id for view in before if view.state != "terminated"]
        final_views = provisioner.wait_until(instance_ids, "terminated", on_progress=lambda text: report(f"waiting: {text}"))
    else:
        before = []
    group_ids = set(groups)
    if cluster.security_group_created and cluster.security_group_id:
        group_ids.add(cluster.security_group_id)
    for group_id in sorted(group_ids):
        report(f"deleting security group {group_id}")
        provisioner.delete_security_group(group_id)
    key_names = set(keys)
    if cluster.key_created and cluster.key_name:
        key_names.add(cluster.key_name)
    for key_name in sorted(key_names):
        report(f"deleting key pair {key_name}")
        provisioner.delete_key_pair(key_name)
    if cluster.key_created or key_names:
        key_file_path(cluster_name).unlink(missing_ok=True)
    templates, _others = _owned_launch_templates(provisioner, cluster_name, launch_id=scope_launch_id, any_owner=any_owner)
    for template in templates:  # a relaunch's, left when deleting it failed
        report(f"deleting launch template {template.detail or template.resource_id}")
        provisioner.delete_launch_template(template.resource_id)

    run_seconds, cost = _run_time_and_cost(cluster, before, final_views)
    with store.locked():
        tombstone = replace(cluster, nodes=tuple(view.to_node() for view in final_views) or cluster.nodes)
        _write(store, tombstone, Phase.DELETED, launch_id, deleted_at=_iso(_now()), final_cost=cost, run_seconds=run_seconds)
    return DownReport(
        cluster_name,
        already_down=not (terminated or group_ids or key_names),
        terminated=tuple(terminated),
        deleted_security_groups=tuple(sorted(group_ids)),
        deleted_key_pairs=tuple(sorted(key_names)),
        run_seconds=run_seconds,
        estimated_cost=cost,
        skipped=tuple(skipped),
    )


def _run_time_and_cost(cluster: Cluster, before: list[Any], after: list[Any]) -> tuple[float, float | None]:
    now = _now()
    seconds_total = 0.0
    longest = 0.0
    for view in before:
        start = _parse_iso(view.launch_time) or _parse_iso(cluster.created_at)
        if start is None or view.state == "terminated":
            continue
        seconds = max(0.0, (now - start).total_seconds())
        seconds_total += seconds
        longest = max(longest, seconds)
    if cluster.price_per_hour is None:
        return longest, None
    return longest, cluster.price_per_hour * seconds_total / 3600.0


def down_all(
    *,
    sandbox: bool | None = None,
    any_owner: bool = False,
    progress: Progress | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
    project_dir: Path | None = None,
) -> list[DownReport]:
    """``down`` every cluster in the local state (every sandbox cluster where the sandbox is in effect),
    each scoped to this gpuflow's resources unless ``any_owner``."""
    in_sandbox = sandbox_in_effect(sandbox, project_dir=project_dir)
    names = [
        name for name, document in _store().all().items()
        if _live(document) and (document.get("sandbox") or not in_sandbox)
    ]
    return [
        down(name, sandbox=in_sandbox, any_owner=any_owner, progress=progress, provisioner_factory=provisioner_factory,
             project_dir=project_dir)
        for name in names
    ]
