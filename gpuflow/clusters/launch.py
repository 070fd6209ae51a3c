"""Up: launch a cluster, claiming its name first, and roll back exactly what this call created on any failure.

``up`` records each thing it creates as it creates it; any failure — an
exception, a refused call, Ctrl-C — deletes exactly those things (instances
terminated and waited for, security group, key pair, local key file, state
record) before the error propagates.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpuflow.clusters.teardown import down
from gpuflow.clusters.owner import _owner, owner_id, whose
from gpuflow.clusters.record import Phase, _iso, _now, _save, _store, _write, key_file_path, phase_of
from gpuflow.clusters.reports import Progress
from gpuflow.clusters.spec import validate_spec
from gpuflow.clusters.reconcile import _price_per_instance
from gpuflow.clusters.where import _place, _provisioner, command_hint
from gpuflow.config import gpuflow_home
from gpuflow.durable.stack import durable_hint, probe_store
from gpuflow.errors import CloudError, GpuflowError, UsageError
from gpuflow.provisioner import Provisioner, ProvisionerFactory
from gpuflow.records import Cluster, ClusterSpec, Node
from gpuflow.state import StateStore, atomic_write_bytes, process_alive
from infra.dlami import DLAMI_SSH_USER
from infra.records import LaunchRequest
from infra.tags import TAG_CLUSTER, TAG_CREATED_AT, TAG_EXPIRES_AT, TAG_LAUNCH, TAG_MANAGED, TAG_OWNER, TAG_OWNER_ID
from infra.userdata import render_user_data

SANDBOX_SSH_CIDR = "127.0.0.1/32"


@dataclass
class _Created:
    """What one `up` has created so far: exactly what its rollback deletes."""

    key_name: str | None = None
    key_file: Path | None = None
    security_group_id: str | None = None
    instance_ids: list[str] = field(default_factory=list)
    state_written: bool = False


def up(
    spec: ClusterSpec,
    *,
    progress: Progress | None = None,
    warn: Progress | None = None,
    detect_caller_ip: Callable[[], str] | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
) -> Cluster:
    """Launch the cluster ``spec`` describes and wait until every instance
    passes its status checks; return it.  If a live cluster of that name
    already exists, return it unchanged (a second ``up`` never makes a second
    cluster).  On any failure, delete what this call created, then re-raise.
    """
    from infra.aws.provisioner import Ec2Provisioner  # boto3: only when a cluster is made

    report = progress or (lambda message: None)
    warning = warn or (lambda message: None)
    spec = validate_spec(spec)
    Ec2Provisioner.validate_region(spec.region)
    home = gpuflow_home()
    store = _store(home)
    provisioner = _provisioner(provisioner_factory, spec.region, spec.profile, spec.sandbox)

    # 1. Validate against AWS before creating anything.
    report(f"checking {spec.instance_type} in {spec.region}")
    info = provisioner.instance_type_info(spec.instance_type)
    if info.gpu_count == 0 and not spec.allow_cpu:
        raise UsageError(
            f"instance type {spec.instance_type!r} has no GPU",
            hint="pick a GPU type such as g5.xlarge, or pass --allow-cpu",
        )
    if spec.spot:
        _check_spot_role(provisioner, warning)  # the sandbox provisioner needs no role
    zones = provisioner.offered_zones(spec.instance_type)
    if not zones:
        raise UsageError(
            f"instance type {spec.instance_type!r} is not offered in any availability zone of {spec.region}",
            hint="try another --region",
        )
    report("resolving the AMI")
    image = provisioner.resolve_image(spec.ami, spec.tensorflow_dlami)
    if image.root_volume_gb and spec.disk_gb < image.root_volume_gb:
        raise UsageError(
            f"--disk-gb {spec.disk_gb} is smaller than the AMI's root snapshot ({image.root_volume_gb} GiB)",
            hint=f"use --disk-gb {image.root_volume_gb} or more",
        )
    if spec.key_name and not provisioner.key_pair_exists(spec.key_name):
        raise UsageError(f"key pair {spec.key_name!r} does not exist in {spec.region}", hint="check --key-name")
    durable = probe_store(provisioner, warning)  # the account stack's role, when `gpuflow setup` made one here
    if durable is None and spec.spot:
        warning(durable_hint(spec.sandbox))
    ssh_cidr = _ssh_cidr(spec, detect_caller_ip, report)
    if ipaddress.ip_network(ssh_cidr).prefixlen == 0:
        warning(f"SSH to cluster {spec.name!r} is open to the whole internet ({ssh_cidr}); anyone may try to log in")
    user_data = render_user_data(
        cluster_name=spec.name, idle_minutes=spec.idle_minutes, max_hours=spec.max_hours, ssh_user=DLAMI_SSH_USER
    )

    # 2. Claim the name (under the lock) unless a cluster of that name exists.
    launch_id = uuid.uuid4().hex
    created_at = _now()
    tags = {
        TAG_CLUSTER: spec.name,
        TAG_OWNER: _owner(),
        TAG_OWNER_ID: owner_id(),
        TAG_CREATED_AT: _iso(created_at),
        TAG_EXPIRES_AT: _iso(created_at + datetime.timedelta(hours=spec.max_hours)),
        TAG_MANAGED: "true",
        TAG_LAUNCH: launch_id,
    }
    cluster = Cluster(
        name=spec.name,
        region=spec.region,
        instance_type=spec.instance_type,
        ami=image.image_id,
        ami_name=image.name or None,
        ami_parameter=image.parameter,
        key_name=spec.key_name,
        key_path=str(Path(spec.key_path).expanduser()) if spec.key_path else None,
        ssh_user=DLAMI_SSH_USER,
        created_at=_iso(created_at),
        spec=spec,
        sandbox=spec.sandbox,
        profile=spec.profile,
        instance_profile_arn=durable.instance_profile_arn if durable else None,
        durable_bucket=durable.bucket if durable else None,
    )
    existing = _claim_name(store, provisioner, cluster, launch_id, report, provisioner_factory, warning)
    if existing is not None:
        return existing

    created = _Created(state_written=True)
    suffix = launch_id[:8]
    try:
        # 3. Key pair.
        if not spec.key_name:
            key_name = f"gpuflow-{spec.name}-{suffix}"
            report(f"creating key pair {key_name}")
            private_key = provisioner.create_key_pair(key_name, tags)
            created.key_name = key_name
            key_file = key_file_path(spec.name, home)
            key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_bytes(key_file, private_key.encode() if private_key.endswith("\n") else (private_key + "\n").encode(), mode=0o600)
            created.key_file = key_file
            cluster = replace(cluster, key_name=key_name, key_path=str(key_file), key_created=True)
            _save(store, cluster, Phase.CREATING, launch_id)

        # 4. Security group: SSH from one address range only.
        vpc_id = provisioner.default_vpc()
        group_name = f"gpuflow-{spec.name}-{suffix}"
        report(f"creating security group {group_name} (SSH from {ssh_cidr})")
        group_id = provisioner.create_security_group(
            group_name, f"gpuflow cluster {spec.name}: SSH from {ssh_cidr} only", vpc_id, tags
        )
        created.security_group_id = group_id
        cluster = replace(cluster, security_group_id=group_id, security_group_created=True)
        _save(store, cluster, Phase.CREATING, launch_id)
        provisioner.authorize_ssh(group_id, ssh_cidr, f"gpuflow {spec.name}: SSH")
        if spec.count > 1:  # its workers talk to each other (gpuflow run on every node): from this group only
            provisioner.authorize_workers(group_id, f"gpuflow {spec.name}: workers")

        # 5. Launch, with zone and market fallbacks.
        request = LaunchRequest(
            cluster_name=spec.name,
            launch_id=launch_id,
            instance_type=spec.instance_type,
            image=image,
            count=spec.count,
            key_name=cluster.key_name or "",
            security_group_id=group_id,
            subnets=provisioner.launch_subnets(vpc_id, zones),
            disk_gb=spec.disk_gb,
            user_data=user_data,
            tags=tags,
            spot=spec.spot,
            spot_fallback=spec.spot_fallback,
            instance_profile_arn=cluster.instance_profile_arn,
        )
        result = provisioner.launch(request, on_attempt=report)
        created.instance_ids = list(result.instance_ids)
        for failure in result.failed_attempts:
            warning(f"no capacity: {failure}; tried the next option")
        if spec.spot and result.market == "on-demand":
            warning("no spot capacity: launched on-demand instead (--spot-fallback)")
        cluster = replace(cluster, nodes=tuple(Node(instance_id, "pending") for instance_id in result.instance_ids))
        _save(store, cluster, Phase.CREATING, launch_id)

        # 6. Wait: running, then both status checks ok.
        views = provisioner.wait_until(result.instance_ids, "running", on_progress=lambda text: report(f"waiting: {text}"))
        cluster = replace(cluster, nodes=tuple(view.to_node() for view in views))
        _save(store, cluster, Phase.CREATING, launch_id)
        views = provisioner.wait_until(result.instance_ids, "ok", on_progress=lambda text: report(f"waiting: {text}"))
        price, _source = _price_per_instance(provisioner, spec.instance_type, result.market, result.availability_zone)
        cluster = replace(cluster, nodes=tuple(view.to_node() for view in views), price_per_hour=price)
        _save(store, cluster, Phase.UP, launch_id)
        return cluster
    except BaseException as exc:
        _rollback(store, provisioner, spec.name, launch_id, created, exc, report, sandbox=spec.sandbox)
        raise


def _check_spot_role(provisioner: Provisioner, warning: Progress) -> None:
    """Spot through the API needs the account's spot service-linked role (AWS
    makes it by itself only for console requests): refuse before creating
    anything when it is missing; go on, saying so, when it cannot be checked."""
    from infra.aws.config import CREATE_SPOT_ROLE_COMMAND, SPOT_SERVICE_LINKED_ROLE  # imports boto3

    exists = provisioner.spot_role_exists()
    if exists is False:
        raise CloudError(
            f"--spot needs the account's {SPOT_SERVICE_LINKED_ROLE} service-linked role, and it does not exist",
            hint=f"create it once (needs iam:CreateServiceLinkedRole): {CREATE_SPOT_ROLE_COMMAND}",
        )
    if exists is None:
        warning(
            f"could not check for the {SPOT_SERVICE_LINKED_ROLE} role (iam:GetRole denied); "
            f"if the spot launch is refused, create it: {CREATE_SPOT_ROLE_COMMAND}"
        )


def _ssh_cidr(spec: ClusterSpec, detect_caller_ip: Callable[[], str] | None, report: Progress) -> str:
    if spec.ssh_cidr:
        return spec.ssh_cidr
    if spec.sandbox:
        return SANDBOX_SSH_CIDR
    if detect_caller_ip is None:
        from infra.aws.caller_ip import detect_caller_ip as detect
    else:
        detect = detect_caller_ip
    report("detecting your public IP address")
    address = ipaddress.ip_address(detect())
    return f"{address}/{32 if address.version == 4 else 128}"


def _claim_name(
    store: StateStore,
    provisioner: Provisioner,
    cluster: Cluster,
    launch_id: str,
    report: Progress,
    provisioner_factory: ProvisionerFactory | None,
    warning: Progress | None = None,
) -> Cluster | None:
    """Write the ``creating`` record unless a cluster of this name is live
    (then return it).  A recorded cluster is looked for where it was recorded
    (region, profile, sandbox), not only where this ``up`` asks: live there, it
    is returned when the places agree and refused otherwise — ``up`` never tears
    down a live cluster.  A record whose instances are all gone there is torn
    down first (a cluster the dead-man's switch ended); an interrupted ``up``
    must be cleaned with ``down`` first.  A name another gpuflow's live instances
    carry is refused with whose they are."""
    warning = warning or report
    with store.locked():
        document = store.get(cluster.name)
        if document is not None and phase_of(document) is Phase.CREATING:
            if document.get("host") == socket.gethostname() and process_alive(document.get("pid")):
                raise UsageError(
                    f"cluster {cluster.name!r} is being created by another gpuflow process (pid {document.get('pid')})",
                    hint="wait for it, or pick another name",
                )
            raise UsageError(
                f"an earlier `gpuflow up {cluster.name}` was interrupted and may have left resources",
                hint=f"run {command_hint(f'down {cluster.name}', cluster.sandbox)} first",
            )
        previous = Cluster.from_dict(document) if document is not None and phase_of(document) is Phase.UP else None
        same_place = previous is not None and _place(previous) == _place(cluster)
        if previous is not None:
            recorded = provisioner if same_place else _provisioner(
                provisioner_factory, previous.region, previous.profile, previous.sandbox
            )
            recorded_live = recorded.find_instances(cluster=cluster.name)
            mine = [view for view in recorded_live if view.tags.get(TAG_LAUNCH) == document.get("launch_id")]
            if mine and same_place:
                report(f"cluster {cluster.name!r} is already up")
                return replace(previous, nodes=tuple(view.to_node() for view in mine))
            if mine:
                raise UsageError(
                    f"cluster {cluster.name!r} is already up in {_place(previous)}, not {_place(cluster)}",
                    hint=(
                        "it is the same cluster: use it there ("
                        + (f"`gpuflow status {cluster.name} --no-sandbox`" if cluster.sandbox and not previous.sandbox
                           else command_hint(f"status {cluster.name}", previous.sandbox))
                        + "), or pick another name"
                    ),
                )
            if recorded_live and not same_place:
                _refuse_taken(previous, recorded_live)
        live_tagged = recorded_live if same_place else provisioner.find_instances(cluster=cluster.name)
        if live_tagged:
            _refuse_taken(cluster, live_tagged)
        if previous is None:
            _write(store, cluster, Phase.CREATING, launch_id)
            return None
    # The previous cluster of this name ended (dead-man's switch, console) — checked where it was
    # recorded: remove its leftovers there first.
    warning(f"cluster {cluster.name!r} in {_place(previous)} ended earlier (no instance of it is live there): removing what is left of it")
    down(cluster.name, sandbox=previous.sandbox, provisioner_factory=provisioner_factory)
    with store.locked():
        document = store.get(cluster.name)
        if document is not None and phase_of(document) is not Phase.DELETED:
            raise UsageError(f"cluster {cluster.name!r} was created concurrently", hint=f"run {command_hint(f'status {cluster.name}', cluster.sandbox)}")
        _write(store, cluster, Phase.CREATING, launch_id)
    return None


def _refuse_taken(where: Cluster, live: list[Any]) -> None:
    """Live instances carry ``where.name`` in its place: refuse the name, saying whose they are.
    Another gpuflow's cluster gets no hint towards ``down`` or ``reap``: it is not ours."""
    me = owner_id()
    name, place = where.name, _place(where)
    others = [view for view in live if view.tags.get(TAG_OWNER_ID) != me]
    ids = ", ".join(view.instance_id for view in live)
    if others:
        raise UsageError(
            f"cluster name {name!r} is taken in {place}: another gpuflow runs it ({whose(others)}; {ids})",
            hint="pick another name: names are shared by everyone who uses this account in that region",
        )
    raise UsageError(
        f"instances tagged as gpuflow cluster {name!r} already run in {place} ({ids})",
        hint=(
            f"this gpuflow launched them without a record here: {command_hint(f'down {name} --region {where.region}', where.sandbox)} "
            f"or {command_hint('reap', where.sandbox)}"
        ),
    )


def _rollback(
    store: StateStore,
    provisioner: Provisioner,
    name: str,
    launch_id: str,
    created: _Created,
    cause: BaseException,
    report: Progress = lambda message: None,
    *,
    sandbox: bool = False,
) -> None:
    """Delete what one ``up`` created, best effort per step; if something
    could not be deleted, keep the record (so ``down`` can finish) and say so."""
    report(f"`up` failed: removing what it created for {name}")
    left: list[str] = []
    instance_ids = set(created.instance_ids)
    with contextlib.suppress(GpuflowError):
        # Instances whose RunInstances answer was lost still carry this up's launch tag.
        instance_ids.update(view.instance_id for view in provisioner.find_instances(cluster=name, launch_id=launch_id))
    if instance_ids:
        report(f"`up` failed: terminating {len(instance_ids)} instance(s)")
        try:
            provisioner.terminate(sorted(instance_ids))
        except GpuflowError:
            left.extend(sorted(instance_ids))
        else:
            with contextlib.suppress(GpuflowError):
                provisioner.wait_until(sorted(instance_ids), "terminated")
    if created.security_group_id:
        try:
            provisioner.delete_security_group(created.security_group_id)
        except GpuflowError:
            left.append(created.security_group_id)
    if created.key_name:
        try:
            provisioner.delete_key_pair(created.key_name)
        except GpuflowError:
            left.append(f"key pair {created.key_name}")
    if created.key_file is not None and not left:
        created.key_file.unlink(missing_ok=True)
    if created.state_written and not left:
        with store.locked():
            store.delete(name)
    if left:
        message = f"`up` failed and could not remove {', '.join(left)}"
        hint = f"run {command_hint(f'down {name}', sandbox)} (or {command_hint('reap', sandbox)})"
        if isinstance(cause, GpuflowError):
            cause.hint = f"{cause.hint + '; ' if cause.hint else ''}{message}; {hint}"
        elif isinstance(cause, Exception):
            cause.args = (f"{cause}; {message}; {hint}",)
