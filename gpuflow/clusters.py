"""Cluster use cases: up, status, ls, down, reap — and what the SSH layer asks EC2.

These functions own the bookkeeping around the AWS provisioner
(:mod:`infra.aws`, imported inside the functions so ``gpuflow --help`` stays
fast):

* **Rollback.**  ``up`` records each thing it creates as it creates it; any
  failure — an exception, a refused call, Ctrl-C — deletes exactly those
  things (instances terminated and waited for, security group, key pair,
  local key file, state record) before the error propagates.
* **State.**  AWS tags are the truth; ``state/clusters/<name>.json`` under
  the gpuflow home is a cache, written atomically under the store's lock.
  Each record carries a ``phase``: ``creating`` (an ``up`` is in progress or
  crashed; ``down`` finishes it), ``up``, or ``deleted`` (a tombstone, so a
  second ``down`` knows the cluster is already gone).  ``status`` and ``ls``
  reconcile the cache with what EC2 reports.
* **Cost.**  On-demand $/h from the dated table ``infra/prices.json``; spot
  from the spot price history.

Every use case takes ``provisioner_factory`` (region, profile, sandbox ->
:class:`gpuflow.provisioner.Provisioner`) so tests can inject one that never
sleeps; the default opens the EC2 one (``infra.aws.open_provisioner``).
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import ipaddress
import os
import re
import secrets
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpuflow.config import gpuflow_home, load_project_config
from gpuflow.errors import (
    ClusterNotFound,
    ConfigError,
    CredentialsError,
    DamagedRecord,
    GpuflowError,
    StateError,
    UsageError,
)
from gpuflow.provisioner import Provisioner, ProvisionerFactory
from gpuflow.records import Cluster, ClusterSpec, Node, check_shape
from gpuflow.state import StateStore, atomic_write_bytes, process_alive, validate_name

DEFAULT_REGION = "us-east-1"
DEFAULT_INSTANCE_TYPE = "g5.xlarge"
SANDBOX_SSH_CIDR = "127.0.0.1/32"
MAX_COUNT = 64
MAX_DISK_GB = 16384

PHASE_CREATING = "creating"
PHASE_UP = "up"
PHASE_DELETED = "deleted"

Progress = Callable[[str], None]

# ClusterSpec fields a project config may set (gpuflow.toml / [tool.gpuflow]), with their types.
_SPEC_CONFIG_TYPES: dict[str, type] = {
    "region": str,
    "instance_type": str,
    "count": int,
    "spot": bool,
    "spot_fallback": bool,
    "disk_gb": int,
    "idle_minutes": int,
    "max_hours": float,
    "ami": str,
    "key_name": str,
    "key_path": str,
    "ssh_cidr": str,
    "allow_cpu": bool,
    "profile": str,
    "sandbox": bool,
    "tensorflow_dlami": str,
}


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ClusterStatus:
    """A cluster reconciled with EC2, with its cost so far."""

    cluster: Cluster
    state: str  # running | pending | partial | stopped | gone | creating | interrupted | unmanaged | unchecked
    known_locally: bool = True
    uptime_seconds: float = 0.0
    price_per_hour: float | None = None  # the whole cluster, USD
    cost_so_far: float | None = None  # USD, estimate
    price_source: str = ""

    @property
    def address(self) -> str | None:
        return self.cluster.nodes[0].public_ip if self.cluster.nodes else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.cluster.name,
            "state": self.state,
            "known_locally": self.known_locally,
            "region": self.cluster.region,
            "instance_type": self.cluster.instance_type,
            "count": len(self.cluster.nodes),
            "address": self.address,
            "uptime_seconds": round(self.uptime_seconds, 1),
            "price_per_hour": self.price_per_hour,
            "cost_so_far": None if self.cost_so_far is None else round(self.cost_so_far, 4),
            "price_source": self.price_source,
            "sandbox": self.cluster.sandbox,
            "nodes": [node.to_dict() for node in self.cluster.nodes],
        }


@dataclass(frozen=True)
class DownReport:
    name: str
    already_down: bool = False
    terminated: tuple[str, ...] = ()
    deleted_security_groups: tuple[str, ...] = ()
    deleted_key_pairs: tuple[str, ...] = ()
    run_seconds: float = 0.0
    estimated_cost: float | None = None
    # Tagged with the cluster's name but created by another gpuflow: left alone without any_owner.
    skipped: tuple[ReapItem, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for key in ("terminated", "deleted_security_groups", "deleted_key_pairs"):
            data[key] = list(data[key])
        data["skipped_other_owners"] = [item.to_dict() for item in data.pop("skipped")]
        return data


@dataclass(frozen=True)
class ReapItem:
    kind: str  # instance | spot-request | volume | security-group | key-pair
    resource_id: str
    region: str
    cluster: str | None
    reason: str
    detail: str | None = None
    owner: str | None = None  # who created it (the gpuflow:owner tag)
    owner_id: str | None = None  # the gpuflow:owner-id tag

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ReapReport:
    items: tuple[ReapItem, ...] = ()
    deleted: bool = False  # False: a dry run (no --yes)
    regions: tuple[str, ...] = ()
    # Orphans another gpuflow created (another owner id, or none): left alone without any_owner.
    skipped: tuple[ReapItem, ...] = ()
    # With expired_only: this gpuflow's orphans not yet past their --max-hours (their job may still run).
    unexpired: tuple[ReapItem, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "deleted": self.deleted,
            "regions": list(self.regions),
            "items": [item.to_dict() for item in self.items],
            "skipped_other_owners": [item.to_dict() for item in self.skipped],
            "left_unexpired": [item.to_dict() for item in self.unexpired],
        }


@dataclass
class _Created:
    """What one `up` has created so far: exactly what its rollback deletes."""

    key_name: str | None = None
    key_file: Path | None = None
    security_group_id: str | None = None
    instance_ids: list[str] = field(default_factory=list)
    state_written: bool = False


# --------------------------------------------------------------------------- helpers
def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def _parse_iso(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def _store(home: Path | None = None) -> StateStore:
    return StateStore(home or gpuflow_home(), "clusters", shape=_check_cluster_record, repair_hint=_damaged_cluster_hint)


@dataclass(frozen=True)
class _RecordBookkeeping:
    """What a cluster record holds besides the :class:`Cluster` (see ``_write``)."""

    phase: str = PHASE_UP
    launch_id: str | None = None
    pid: int | None = None
    host: str | None = None
    deleted_at: str | None = None
    final_cost: float | None = None
    run_seconds: float | None = None
    reaped: bool = False


def _check_cluster_record(name: str, document: dict[str, Any]) -> None:
    """A cluster record parses into a Cluster (plus its bookkeeping) and is
    the record of the name it is stored under (else writing it back would
    overwrite another cluster's record)."""
    check_shape(Cluster, document)
    check_shape(_RecordBookkeeping, document)
    if document["name"] != name:
        raise ValueError(f"it holds cluster {document['name']!r}, not {name!r}")
    if _recorded_region(document) is None:
        raise ValueError(f"region {document['region']!r} is not an AWS region name")
    if document.get("phase", PHASE_UP) not in (PHASE_CREATING, PHASE_UP, PHASE_DELETED):
        raise ValueError(f"unknown phase {document['phase']!r}")


def _recorded(raw: Any, key: str, kind: type) -> Any:
    """One field of a damaged record, if it can still be read (else None)."""
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, kind) else None


def _recorded_region(raw: Any) -> str | None:
    region = _recorded(raw, "region", str)
    return region if region and re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", region) else None


def _damaged_cluster_hint(name: str, raw: Any) -> str:
    region = _recorded_region(raw)
    where = f"in {region}" if region else "in --region REGION (the record does not say where it ran)"
    command = command_hint(f"down {name}" + ("" if region else " --region REGION"), _recorded(raw, "sandbox", bool) is True)
    return f"{command} tears the cluster down from its AWS tags {where} and replaces the record"


def key_file_path(name: str, home: Path | None = None) -> Path:
    """Where ``up`` keeps a cluster's private key (mode 0600)."""
    return (home or gpuflow_home()) / "keys" / f"{validate_name(name, 'cluster name')}.pem"


def default_region(environ: Mapping[str, str] | None = None) -> str:
    """Project config is applied by the caller; this is the built-in chain:
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else us-east-1."""
    environ = os.environ if environ is None else environ
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def _default_provisioner(region: str, *, profile: str | None = None, sandbox: bool = False) -> Provisioner:
    from infra.aws import open_provisioner

    return open_provisioner(region, profile=profile, sandbox=sandbox)


def _provisioner(factory: ProvisionerFactory | None, region: str, profile: str | None, sandbox: bool) -> Provisioner:
    return (factory or _default_provisioner)(region, profile=profile, sandbox=sandbox)


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
# `reap --expired` waits this long past gpuflow:expires-at: the dead-man's switch counts
# --max-hours from the instance's boot, which comes minutes after the tag's created-at.
EXPIRY_GRACE = datetime.timedelta(hours=1)


def _owned_cluster_resources(
    provisioner: Provisioner, name: str, *, launch_id: str | None = None, any_owner: bool = False
) -> tuple[list[Any], list[str], list[str], list[ReapItem]]:
    """What is tagged as cluster ``name`` where ``provisioner`` looks, split by whose it is:
    (live instance views, security group ids, key pair names) this gpuflow created — its
    :func:`owner_id`, or the ``up`` ``launch_id`` its record names — and the rest, another
    gpuflow's, as skipped items.  ``any_owner`` takes everything.  A name alone never says
    whose something is: two people may both call a cluster ``ml``."""
    from infra.aws.provisioner import TAG_LAUNCH, TAG_OWNER, TAG_OWNER_ID

    me = owner_id()

    def mine(owner: str | None, launch: str | None) -> bool:
        return any_owner or owner == me or (launch_id is not None and launch == launch_id)

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


def whose(items: Iterable[Any]) -> str:
    """Who created these (ReapItems or InstanceViews): "user@host (owner id X)", for messages."""
    from infra.aws.provisioner import TAG_OWNER, TAG_OWNER_ID

    labels = set()
    for item in items:
        tags = getattr(item, "tags", None)
        owner, owner_tag = (tags.get(TAG_OWNER), tags.get(TAG_OWNER_ID)) if tags is not None else (item.owner, item.owner_id)
        identity = f"owner id {owner_tag}" if owner_tag else "no owner id"
        labels.add(f"{owner} ({identity})" if owner else identity)
    return ", ".join(sorted(labels)) or "unknown"


def _default_cluster_name(project_root: Path) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", project_root.name).strip("-._")[:63]
    return cleaned or "gpuflow"


# --------------------------------------------------------------------------- spec
def resolve_spec(name: str | None = None, options: Mapping[str, Any] | None = None, *, project_dir: Path | None = None) -> ClusterSpec:
    """The ClusterSpec for ``up``: command-line ``options`` (None = not given)
    over the project config over built-in defaults; then validated."""
    config = load_project_config(project_dir)
    values: dict[str, Any] = {}
    for key, expected in _SPEC_CONFIG_TYPES.items():
        if key in config.settings:
            values[key] = _config_value(key, config.settings[key], expected, config.source)
    for key, value in (options or {}).items():
        if value is not None:
            values[key] = value
    cluster_name = name or config.get("cluster") or config.get("name") or _default_cluster_name(config.root)
    values.setdefault("region", default_region())
    values.setdefault("instance_type", DEFAULT_INSTANCE_TYPE)
    known = set(ClusterSpec.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise UsageError(f"unknown cluster option(s): {', '.join(sorted(unknown))}")
    return validate_spec(ClusterSpec(name=str(cluster_name), **values))


def _config_value(key: str, value: Any, expected: type, source: Path | None) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be of type {expected.__name__}, got {value!r}")
    return value


def validate_spec(spec: ClusterSpec) -> ClusterSpec:
    """Local checks (no AWS call): name, sizes, timers, CIDR.  Returns the spec
    with the CIDR normalised."""
    from infra.userdata import validate_idle_minutes, validate_max_hours

    validate_name(spec.name, "cluster name")
    if not isinstance(spec.count, int) or isinstance(spec.count, bool) or not 1 <= spec.count <= MAX_COUNT:
        raise UsageError(f"--count must be between 1 and {MAX_COUNT}, got {spec.count!r}")
    if not isinstance(spec.disk_gb, int) or isinstance(spec.disk_gb, bool) or not 1 <= spec.disk_gb <= MAX_DISK_GB:
        raise UsageError(
            f"--disk-gb must be a whole number of GiB between 1 and {MAX_DISK_GB}, got {spec.disk_gb!r}",
            hint="the Deep Learning AMI needs about 100",
        )
    validate_idle_minutes(spec.idle_minutes)
    validate_max_hours(spec.max_hours)
    if not spec.instance_type or not re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+", spec.instance_type):
        raise UsageError(f"invalid instance type {spec.instance_type!r}", hint="use a name such as g5.xlarge")
    if spec.key_name and not spec.key_path:
        raise UsageError("--key-name needs --key-path (the private key file of that key pair)")
    if spec.key_path and not spec.key_name:
        raise UsageError("--key-path needs --key-name (the EC2 key pair it belongs to)")
    if spec.key_path and not Path(spec.key_path).expanduser().is_file():
        raise UsageError(f"key file {spec.key_path!r} does not exist")
    if spec.ssh_cidr is None:
        return spec
    return replace(spec, ssh_cidr=normalise_cidr(spec.ssh_cidr, allow_anywhere=spec.allow_ssh_from_anywhere))


def normalise_cidr(cidr: str, *, allow_anywhere: bool = False) -> str:
    """A valid IPv4/IPv6 CIDR (a bare address becomes /32 or /128); the whole
    internet only with explicit consent."""
    try:
        network = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError as exc:
        raise UsageError(f"invalid --ssh-cidr {cidr!r}", hint="use an address range such as 203.0.113.7/32") from exc
    if network.prefixlen == 0 and not allow_anywhere:
        raise UsageError(
            f"--ssh-cidr {cidr} opens SSH to the whole internet",
            hint="pass your own address/32, or add --allow-ssh-from-anywhere if you really mean it",
        )
    return str(network)


# --------------------------------------------------------------------------- up
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
    from infra.aws.provisioner import (
        TAG_CLUSTER,
        TAG_CREATED_AT,
        TAG_EXPIRES_AT,
        TAG_LAUNCH,
        TAG_MANAGED,
        TAG_OWNER,
        TAG_OWNER_ID,
        Ec2Provisioner,
    )
    from infra.dlami import DLAMI_SSH_USER
    from infra.userdata import render_user_data

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
    if spec.spot and not spec.sandbox:
        _check_spot_role(provisioner, warning)
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
            _save(store, cluster, PHASE_CREATING, launch_id)

        # 4. Security group: SSH from one address range only.
        vpc_id = provisioner.default_vpc()
        group_name = f"gpuflow-{spec.name}-{suffix}"
        report(f"creating security group {group_name} (SSH from {ssh_cidr})")
        group_id = provisioner.create_security_group(
            group_name, f"gpuflow cluster {spec.name}: SSH from {ssh_cidr} only", vpc_id, tags
        )
        created.security_group_id = group_id
        cluster = replace(cluster, security_group_id=group_id, security_group_created=True)
        _save(store, cluster, PHASE_CREATING, launch_id)
        provisioner.authorize_ssh(group_id, ssh_cidr, f"gpuflow {spec.name}: SSH")

        # 5. Launch, with zone and market fallbacks.
        from infra.aws.provisioner import LaunchRequest

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
        )
        result = provisioner.launch(request, on_attempt=report)
        created.instance_ids = list(result.instance_ids)
        for failure in result.failed_attempts:
            warning(f"no capacity: {failure}; tried the next option")
        if spec.spot and result.market == "on-demand":
            warning("no spot capacity: launched on-demand instead (--spot-fallback)")
        cluster = replace(cluster, nodes=tuple(Node(instance_id, "pending") for instance_id in result.instance_ids))
        _save(store, cluster, PHASE_CREATING, launch_id)

        # 6. Wait: running, then both status checks ok.
        views = provisioner.wait_until(result.instance_ids, "running", on_progress=lambda text: report(f"waiting: {text}"))
        cluster = replace(cluster, nodes=tuple(view.to_node() for view in views))
        _save(store, cluster, PHASE_CREATING, launch_id)
        views = provisioner.wait_until(result.instance_ids, "ok", on_progress=lambda text: report(f"waiting: {text}"))
        price, _source = _price_per_instance(provisioner, spec.instance_type, result.market, result.availability_zone)
        cluster = replace(cluster, nodes=tuple(view.to_node() for view in views), price_per_hour=price)
        _save(store, cluster, PHASE_UP, launch_id)
        return cluster
    except BaseException as exc:
        _rollback(store, provisioner, spec.name, launch_id, created, exc, report, sandbox=spec.sandbox)
        raise


def _check_spot_role(provisioner: Provisioner, warning: Progress) -> None:
    """Spot through the API needs the account's spot service-linked role (AWS
    makes it by itself only for console requests): refuse before creating
    anything when it is missing; go on, saying so, when it cannot be checked."""
    from gpuflow.errors import CloudError
    from infra.aws.provisioner import CREATE_SPOT_ROLE_COMMAND, SPOT_SERVICE_LINKED_ROLE

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
    from infra.aws.provisioner import TAG_LAUNCH

    warning = warning or report
    with store.locked():
        document = store.get(cluster.name)
        if document is not None and document.get("phase") == PHASE_CREATING:
            if document.get("host") == socket.gethostname() and process_alive(document.get("pid")):
                raise UsageError(
                    f"cluster {cluster.name!r} is being created by another gpuflow process (pid {document.get('pid')})",
                    hint="wait for it, or pick another name",
                )
            raise UsageError(
                f"an earlier `gpuflow up {cluster.name}` was interrupted and may have left resources",
                hint=f"run {command_hint(f'down {cluster.name}', cluster.sandbox)} first",
            )
        previous = Cluster.from_dict(document) if document is not None and document.get("phase") == PHASE_UP else None
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
            _write(store, cluster, PHASE_CREATING, launch_id)
            return None
    # The previous cluster of this name ended (dead-man's switch, console) — checked where it was
    # recorded: remove its leftovers there first.
    warning(f"cluster {cluster.name!r} in {_place(previous)} ended earlier (no instance of it is live there): removing what is left of it")
    down(cluster.name, sandbox=previous.sandbox, provisioner_factory=provisioner_factory)
    with store.locked():
        document = store.get(cluster.name)
        if document is not None and document.get("phase") != PHASE_DELETED:
            raise UsageError(f"cluster {cluster.name!r} was created concurrently", hint=f"run {command_hint(f'status {cluster.name}', cluster.sandbox)}")
        _write(store, cluster, PHASE_CREATING, launch_id)
    return None


def _place(cluster: Cluster) -> str:
    """Where a cluster lives, for comparing and for messages: region, sandbox, profile."""
    return cluster.region + (" (sandbox)" if cluster.sandbox else "") + (f" (profile {cluster.profile})" if cluster.profile else "")


def _refuse_taken(where: Cluster, live: list[Any]) -> None:
    """Live instances carry ``where.name`` in its place: refuse the name, saying whose they are.
    Another gpuflow's cluster gets no hint towards ``down`` or ``reap``: it is not ours."""
    from infra.aws.provisioner import TAG_OWNER_ID

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


def _write(store: StateStore, cluster: Cluster, phase: str, launch_id: str | None, **extra: Any) -> None:
    document = cluster.to_dict()
    document.update(phase=phase, launch_id=launch_id, pid=os.getpid(), host=socket.gethostname(), **extra)
    store.put(cluster.name, document)


def _save(store: StateStore, cluster: Cluster, phase: str, launch_id: str | None, **extra: Any) -> None:
    with store.locked():
        _write(store, cluster, phase, launch_id, **extra)


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


# --------------------------------------------------------------------------- status / ls
def resolve_cluster_name(name: str | None = None, *, project_dir: Path | None = None) -> str:
    """``name``; else the project config's ``cluster``; else the only cluster
    in the local state."""
    if name:
        return validate_name(name, "cluster name")
    config = load_project_config(project_dir)
    configured = config.get("cluster") or config.get("name")
    if configured:
        return validate_name(str(configured), "cluster name")
    names = [key for key, document in _store().all().items() if document.get("phase") != PHASE_DELETED]
    if len(names) == 1:
        return names[0]
    if not names:
        raise ClusterNotFound("no clusters", hint=f"start one with {command_hint('up', sandbox_in_effect(project_dir=project_dir))}")
    raise UsageError(f"several clusters exist ({', '.join(names)}): name one")


def get_cluster(name: str | None = None) -> Cluster:
    """The cached record of cluster ``name`` (no AWS call); ClusterNotFound
    when gpuflow knows no live cluster of that name."""
    cluster_name = resolve_cluster_name(name)
    document = _store().get(cluster_name)
    if document is None or document.get("phase") == PHASE_DELETED:
        in_sandbox = sandbox_in_effect()
        raise ClusterNotFound(
            f"no cluster named {cluster_name!r}",
            hint=f"see {command_hint('ls', in_sandbox)}, or start it with {command_hint('up', in_sandbox)}",
        )
    return Cluster.from_dict(document)


def _cluster_views(provisioner: Provisioner, name: str, launch_id: str | None) -> list[Any]:
    """All instances (any state) of cluster ``name``, of its latest ``up`` when known."""
    from infra.aws.provisioner import TAG_LAUNCH

    views = provisioner.find_instances(cluster=name, states=())
    if launch_id:
        views = [view for view in views if view.tags.get(TAG_LAUNCH) == launch_id]
    return views


def _summarise(nodes: Iterable[Node]) -> str:
    states = [node.state for node in nodes]
    if not states or all(state in ("terminated", "shutting-down", "not-found") for state in states):
        return "gone"
    if all(state == "running" for state in states):
        return "running"
    if all(state in ("pending", "running") for state in states):
        return "pending"
    if all(state in ("stopped", "stopping") for state in states):
        return "stopped"
    return "partial"


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


def _status_from(cluster: Cluster, state: str, *, known: bool, price_source: str = "", now: datetime.datetime | None = None) -> ClusterStatus:
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
) -> ClusterStatus:
    """Cluster ``name`` reconciled with EC2 (the cache is updated): an
    instance terminated outside gpuflow shows as gone.  A name without a local
    record is looked up by its tags in the configured region: this gpuflow's
    instances show as ``unmanaged``; another gpuflow's are a ClusterNotFound
    saying whose, and shown only with ``any_owner``."""
    cluster_name = resolve_cluster_name(name)
    in_sandbox = sandbox_in_effect(sandbox)
    store = _store()
    document = store.get(cluster_name)
    if document is None or document.get("phase") == PHASE_DELETED:
        return _unrecorded_status(store, cluster_name, document, any_owner, in_sandbox, provisioner_factory)
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
) -> ClusterStatus:
    provisioner, region, live, others = _look_up_unrecorded(
        store, name, tombstone, any_owner, in_sandbox, provisioner_factory
    )
    if live:
        return _unmanaged_status(provisioner, region, name, live)
    if others:
        raise _another_owners(name, region, others, hint=f"{command_hint(f'status {name} --any-owner', in_sandbox)} shows it")
    raise ClusterNotFound(f"no cluster named {name!r}", hint=f"see {command_hint('ls', in_sandbox)}")


def _look_up_unrecorded(
    store: StateStore,
    name: str,
    tombstone: dict[str, Any] | None,
    any_owner: bool,
    in_sandbox: bool,
    provisioner_factory: ProvisionerFactory | None,
) -> tuple[Provisioner, str, list[Any], list[ReapItem]]:
    """A name without a live record, looked up by its tags where a tombstone of the same
    cloud says it was, else in the configured region of the cloud in effect: (provisioner,
    region, live instances this gpuflow created — all with ``any_owner`` —, another
    gpuflow's live instances)."""
    if tombstone is not None and bool(tombstone.get("sandbox")) == in_sandbox:  # downed here: look where it was
        region, profile = tombstone["region"], tombstone.get("profile")
    else:
        region, profile = _configured_region(), None
    provisioner = _provisioner(provisioner_factory, region, profile, in_sandbox)
    live, _groups, _keys, skipped = _owned_cluster_resources(provisioner, name, any_owner=any_owner)
    return provisioner, region, live, [item for item in skipped if item.kind == "instance"]


def _another_owners(name: str, region: str, others: list[ReapItem], *, hint: str) -> ClusterNotFound:
    return ClusterNotFound(
        f"no cluster of this gpuflow named {name!r}: the one in {region} belongs to another gpuflow ({whose(others)})",
        hint=hint,
    )


def explain_unknown(name: str, cause: ClusterNotFound, *, provisioner_factory: ProvisionerFactory | None = None) -> ClusterNotFound:
    """The error for ``ssh``/``run`` on a name this gpuflow has no live record of: says
    whose the cluster of that name is when its tags show one (neither command can reach
    it — the key and pinned host keys live with whoever launched it), else ``cause``."""
    store = _store()
    document = store.get(name)
    if document is not None and document.get("phase") != PHASE_DELETED:
        return cause
    try:
        in_sandbox = sandbox_in_effect()
        _provisioner_used, region, live, others = _look_up_unrecorded(
            store, name, document, False, in_sandbox, provisioner_factory
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


def _reconcile(store: StateStore, provisioner: Provisioner, cluster: Cluster, document: dict[str, Any], views: list[Any] | None = None) -> ClusterStatus:
    launch_id = document.get("launch_id")
    if views is None:
        views = _cluster_views(provisioner, cluster.name, launch_id)
    by_id = {view.instance_id: view for view in views}
    known_ids = [node.instance_id for node in cluster.nodes]
    nodes = [by_id[i].to_node() if i in by_id else Node(i, "not-found") for i in known_ids]
    nodes += [view.to_node() for view in views if view.instance_id not in known_ids]
    cluster = replace(cluster, nodes=tuple(nodes))
    phase = document.get("phase", PHASE_UP)
    if phase == PHASE_CREATING:
        in_progress = document.get("host") == socket.gethostname() and process_alive(document.get("pid"))
        state = PHASE_CREATING if in_progress else "interrupted"  # a crashed `up`: `down` finishes it
    else:
        state = _summarise(cluster.nodes)
    with store.locked():
        current = store.get(cluster.name)
        if current is not None and current.get("launch_id") == launch_id and current.get("phase") == phase:
            current.update(nodes=[node.to_dict() for node in cluster.nodes])
            store.put(cluster.name, current)
    source = ""
    if cluster.price_per_hour is not None:
        source = "spot price history" if any(node.lifecycle == "spot" for node in cluster.nodes) else "on-demand list price"
    return _status_from(cluster, state, known=True, price_source=source)


def list_clusters(
    *, region: str | None = None, sandbox: bool | None = None, provisioner_factory: ProvisionerFactory | None = None
) -> list[ClusterStatus]:
    """Every cluster gpuflow knows locally, reconciled, plus clusters EC2 has
    tagged instances of that the local state does not know (state
    ``unmanaged``; ``reap`` removes them).  Scans ``region`` (default: the
    configured one) and the regions of the local clusters.  Where the sandbox
    is in effect the stray scan is of the sandbox cloud, and AWS clusters known
    here are listed as ``unchecked``, without asking AWS."""
    from infra.aws.provisioner import TAG_LAUNCH

    store = _store()
    documents = {name: doc for name, doc in store.all().items() if doc.get("phase") != PHASE_DELETED}
    scan_region = region or _configured_region()
    scan_sandbox = sandbox_in_effect(sandbox)
    groups: dict[tuple[str, str | None, bool], list[str]] = {(scan_region, None, scan_sandbox): []}
    unchecked: list[ClusterStatus] = []
    for name, document in documents.items():
        if scan_sandbox and not document.get("sandbox"):
            unchecked.append(_status_from(Cluster.from_dict(document), "unchecked", known=True))
            continue
        key = (document["region"], document.get("profile"), bool(document.get("sandbox")))
        groups.setdefault(key, []).append(name)
    results: list[ClusterStatus] = []
    strays_seen: set[tuple[str, str]] = set()  # one in-process mock can back two groups
    for (group_region, profile, group_sandbox), names in sorted(groups.items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][2])):
        provisioner = _provisioner(provisioner_factory, group_region, profile, group_sandbox)
        try:
            views = provisioner.find_instances(states=())
        except CredentialsError:
            if names or region:
                raise
            continue  # only scanning for strays, and no AWS account configured (sandbox-only users)
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
    return results + unchecked


def _unmanaged_status(provisioner: Provisioner, region: str, name: str, views: list[Any], sandbox: bool = False) -> ClusterStatus:
    from infra.aws.provisioner import TAG_CREATED_AT

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
    return replace(_status_from(cluster, "unmanaged", known=False, price_source=source), state="unmanaged")


def _configured_region() -> str:
    configured = load_project_config().get("region")
    return str(configured) if configured else default_region()


def sandbox_in_effect(sandbox: bool | None = None, *, project_dir: Path | None = None) -> bool:
    """Whether the sandbox cloud is in effect where no cluster record decides:
    the ``--sandbox`` / ``--no-sandbox`` flag when given, else the project
    config's ``sandbox`` (False without one).  The one place this is decided;
    the provisioner factory is then called with it.  A recorded cluster is
    asked where it was made, except that a sandbox context never asks AWS
    about a recorded AWS cluster (:func:`_refuse_aws_record_in_sandbox`)."""
    if sandbox is not None:
        return bool(sandbox)
    config = load_project_config(project_dir)
    if "sandbox" not in config.settings:
        return False
    return _config_value("sandbox", config.settings["sandbox"], bool, config.source)


def command_hint(command: str, sandbox: bool) -> str:
    """A gpuflow command for a hint; in a sandbox context it always says --sandbox
    (the same command without it could act on the real AWS account)."""
    return f"`gpuflow {command}{' --sandbox' if sandbox else ''}`"


def _refuse_aws_record_in_sandbox(cluster: Cluster, sandbox: bool, command: str) -> None:
    if sandbox and not cluster.sandbox:
        raise UsageError(
            f"cluster {cluster.name!r} is an AWS cluster ({cluster.region}), but the sandbox is in effect here "
            "(--sandbox, or sandbox = true in the project config): nothing is asked of AWS",
            hint=f"`gpuflow {command} {cluster.name} --no-sandbox` acts on it",
        )


# --------------------------------------------------------------------------- down
def down(
    name: str | None = None,
    *,
    region: str | None = None,
    sandbox: bool | None = None,
    any_owner: bool = False,
    progress: Progress | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
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
    cluster_name = resolve_cluster_name(name)
    in_sandbox = sandbox_in_effect(sandbox)
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
            region=region or _recorded_region(damaged.raw) or _configured_region(),
            instance_type="",
            ami="",
            profile=_recorded(damaged.raw, "profile", str),
            sandbox=in_sandbox if recorded_sandbox is None else recorded_sandbox,
        )
        _refuse_aws_record_in_sandbox(cluster, in_sandbox, "down")
        provisioner = _provisioner(provisioner_factory, cluster.region, cluster.profile, cluster.sandbox)
        launch_id = None
        scope_launch_id = _recorded(damaged.raw, "launch_id", str)  # its own `up`'s resources, if still readable
    elif document is not None and document.get("phase") == PHASE_DELETED:
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
        cluster = Cluster(name=cluster_name, region=region or _configured_region(), instance_type="", ami="", sandbox=in_sandbox)
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

    run_seconds, cost = _run_time_and_cost(cluster, before, final_views)
    with store.locked():
        tombstone = replace(cluster, nodes=tuple(view.to_node() for view in final_views) or cluster.nodes)
        _write(store, tombstone, PHASE_DELETED, launch_id, deleted_at=_iso(_now()), final_cost=cost, run_seconds=run_seconds)
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
) -> list[DownReport]:
    """``down`` every cluster in the local state (every sandbox cluster where the sandbox is in effect),
    each scoped to this gpuflow's resources unless ``any_owner``."""
    in_sandbox = sandbox_in_effect(sandbox)
    names = [
        name for name, document in _store().all().items()
        if document.get("phase") != PHASE_DELETED and (document.get("sandbox") or not in_sandbox)
    ]
    return [
        down(name, sandbox=in_sandbox, any_owner=any_owner, progress=progress, provisioner_factory=provisioner_factory)
        for name in names
    ]


# --------------------------------------------------------------------------- reap
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
) -> ReapReport:
    """Find everything tagged ``gpuflow:managed`` that no live cluster owns —
    instances of clusters the local state does not know, and the security
    groups, key pairs, unattached volumes and open spot requests of clusters
    that are gone — and, with ``yes``, delete it.  Without ``yes`` nothing is
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
    sandbox = sandbox_in_effect(sandbox)
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
    documents = {name: doc for name, doc in store.all().items() if doc.get("phase") != PHASE_DELETED}
    regions = {region or _configured_region()} | {
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
                document.get("phase") == PHASE_CREATING
                and document.get("host") == socket.gethostname()
                and process_alive(document.get("pid"))
            )
            # Live means live instances of *this record's* `up`: another owner's cluster that took
            # the name after ours ended does not keep our leftovers from being reaped.
            if creating_alive or (document.get("phase") == PHASE_UP and (name, document.get("launch_id")) in live_launches):
                owned.add(name)
        orphans, others = [], []
        for resource in resources:
            if resource.cluster in owned or resource.cluster in {record.name for record in store.damaged}:
                continue  # a damaged record's cluster is left to `gpuflow down NAME` (warned above)
            if resource.kind == "instance":
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
            if resource.cluster:
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
    with store.locked():
        for name in sorted(reaped_clusters):
            if not _is_valid_name(name):  # a tag value gpuflow did not write: no local file can match it
                continue
            document = store.get(name)
            if document is None or document.get("phase") == PHASE_DELETED:
                if name in reaped_key_clusters:
                    key_file_path(name).unlink(missing_ok=True)  # its key pair is gone: the private key is useless
                continue
            _write(store, Cluster.from_dict(document), PHASE_DELETED, document.get("launch_id"), deleted_at=_iso(_now()), reaped=True)
            key_file_path(name).unlink(missing_ok=True)
    return ReapReport(
        tuple(items), deleted=True, regions=tuple(sorted(regions)), skipped=tuple(skipped), unexpired=tuple(unexpired)
    )


def _is_valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except UsageError:
        return False
    return True


# --------------------------------------------------------------------------- for the SSH layer
def instance_state(cluster: Cluster, instance_id: str, *, provisioner_factory: ProvisionerFactory | None = None) -> str:
    """What EC2 says about one instance now: 'running', 'terminated', ...,
    or 'not-found'.  Lets the SSH layer tell a network blip from a dead instance."""
    provisioner = _provisioner(provisioner_factory, cluster.region, cluster.profile, cluster.sandbox)
    return provisioner.instance_state(instance_id)


def console_output(cluster: Cluster, instance_id: str, *, provisioner_factory: ProvisionerFactory | None = None) -> str:
    """The instance's console text (cloud-init prints the SSH host key
    fingerprints there; the SSH layer pins them)."""
    provisioner = _provisioner(provisioner_factory, cluster.region, cluster.profile, cluster.sandbox)
    return provisioner.console_output(instance_id)


__all__ = [
    "ClusterStatus",
    "DownReport",
    "ReapItem",
    "ReapReport",
    "command_hint",
    "console_output",
    "default_region",
    "down",
    "down_all",
    "explain_unknown",
    "get_cluster",
    "instance_state",
    "key_file_path",
    "list_clusters",
    "normalise_cidr",
    "reap",
    "resolve_cluster_name",
    "resolve_spec",
    "sandbox_in_effect",
    "status",
    "up",
    "validate_spec",
    "whose",
]
