"""The records the cloud layer hands to gpuflow: nodes, instance views, images, launches, tagged resources.

Frozen dataclasses, built from EC2's answers (``from_api``);
:mod:`gpuflow.records` re-exports :class:`Node`, the one gpuflow keeps in its
cluster records (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any

from infra.tags import (
    TAG_CLUSTER,
    TAG_CREATED_AT,
    TAG_EXPIRES_AT,
    TAG_LAUNCH,
    TAG_OWNER,
    TAG_OWNER_ID,
    tag_dict,
)


@dataclass(frozen=True)
class Node:
    """One instance of a cluster, as the cloud reports it."""

    instance_id: str
    state: str  # pending | running | stopping | stopped | shutting-down | terminated
    public_ip: str | None = None
    private_ip: str | None = None
    availability_zone: str | None = None
    launch_time: str | None = None  # ISO 8601, UTC
    lifecycle: str = "on-demand"  # or "spot"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")
    return str(value)


@dataclass(frozen=True)
class InstanceTypeInfo:
    name: str
    gpu_count: int
    gpu_name: str | None
    gpu_memory_mib: int
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    name: str
    root_device_name: str
    source: str  # "ssm" | "name-search" | "explicit"
    root_volume_gb: int | None = None  # size of the root snapshot: the smallest root volume EC2 accepts
    parameter: str | None = None  # the public SSM parameter the id came from

    @classmethod
    def from_api(cls, image: dict[str, Any], source: str) -> ImageInfo:
        root_device = image.get("RootDeviceName") or "/dev/sda1"
        sizes = [
            mapping.get("Ebs", {}).get("VolumeSize")
            for mapping in image.get("BlockDeviceMappings", [])
            if mapping.get("DeviceName") == root_device
        ]
        size = next((int(value) for value in sizes if value), None)
        return cls(image["ImageId"], image.get("Name", ""), root_device, source, size)


@dataclass(frozen=True)
class InstanceView:
    """One instance as EC2 describes it, with its tags."""

    instance_id: str
    state: str
    instance_type: str
    public_ip: str | None
    private_ip: str | None
    availability_zone: str | None
    launch_time: str | None
    lifecycle: str
    tags: dict[str, str] = field(default_factory=dict)
    spot_request_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    key_name: str | None = None
    state_reason: str | None = None

    @property
    def cluster(self) -> str | None:
        return self.tags.get(TAG_CLUSTER)

    def to_node(self) -> Node:
        return Node(
            instance_id=self.instance_id,
            state=self.state,
            public_ip=self.public_ip,
            private_ip=self.private_ip,
            availability_zone=self.availability_zone,
            launch_time=self.launch_time,
            lifecycle=self.lifecycle,
        )

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> InstanceView:
        return cls(
            instance_id=data["InstanceId"],
            state=data.get("State", {}).get("Name", "unknown"),
            instance_type=data.get("InstanceType", ""),
            public_ip=data.get("PublicIpAddress"),
            private_ip=data.get("PrivateIpAddress"),
            availability_zone=data.get("Placement", {}).get("AvailabilityZone"),
            launch_time=_iso(data.get("LaunchTime")),
            lifecycle="spot" if data.get("InstanceLifecycle") == "spot" else "on-demand",
            tags=tag_dict(data.get("Tags")),
            spot_request_id=data.get("SpotInstanceRequestId"),
            security_group_ids=tuple(group["GroupId"] for group in data.get("SecurityGroups", ())),
            key_name=data.get("KeyName"),
            state_reason=(data.get("StateReason") or {}).get("Message"),
        )


@dataclass(frozen=True)
class LaunchRequest:
    cluster_name: str
    launch_id: str
    instance_type: str
    image: ImageInfo
    count: int
    key_name: str
    security_group_id: str
    subnets: tuple[tuple[str, str], ...]  # (subnet id, availability zone), in the order to try
    disk_gb: int
    user_data: str
    tags: dict[str, str]
    spot: bool = False
    spot_fallback: bool = False
    instance_profile_arn: str | None = None  # the account stack's profile (durable runs), else no role at all


@dataclass(frozen=True)
class LaunchResult:
    instance_ids: tuple[str, ...]
    availability_zone: str
    market: str  # "spot" | "on-demand"
    failed_attempts: tuple[str, ...] = ()  # "us-east-1a/spot: InsufficientInstanceCapacity", ...
    instance_type: str | None = None  # the type launched, where the launch chose it (EC2 Fleet)


@dataclass(frozen=True)
class FleetPool:
    """One capacity pool an EC2 Fleet may launch in: an instance type in a subnet (its zone)."""

    instance_type: str
    subnet_id: str
    availability_zone: str


@dataclass(frozen=True)
class FleetStep:
    """One EC2 Fleet call: the pools EC2 chooses among (in priority order) and the market."""

    market: str  # "spot" | "on-demand"
    pools: tuple[FleetPool, ...]

    def __str__(self) -> str:
        types = list(dict.fromkeys(pool.instance_type for pool in self.pools))
        zones = list(dict.fromkeys(pool.availability_zone for pool in self.pools))
        return f"{', '.join(types)} ({self.market}) in {', '.join(zones)}"


@dataclass(frozen=True)
class LaunchTemplateRef:
    """A launch template gpuflow made for one relaunch (deleted right after its fleet calls)."""

    template_id: str
    name: str


@dataclass(frozen=True)
class ManagedResource:
    """Something tagged ``gpuflow:managed`` (for reap)."""

    kind: str  # instance | volume | security-group | key-pair | spot-request | launch-template
    resource_id: str
    cluster: str | None
    created_at: str | None = None
    state: str | None = None
    detail: str | None = None
    owner: str | None = None  # the gpuflow:owner tag (user@host that created it)
    owner_id: str | None = None  # the gpuflow:owner-id tag
    expires_at: str | None = None  # the gpuflow:expires-at tag
    launch_id: str | None = None  # the gpuflow:launch-id tag


def managed_resource(
    kind: str, resource_id: str, tags: dict[str, str], state: str | None = None, detail: str | None = None
) -> ManagedResource:
    return ManagedResource(
        kind, resource_id, tags.get(TAG_CLUSTER), tags.get(TAG_CREATED_AT), state, detail,
        tags.get(TAG_OWNER), tags.get(TAG_OWNER_ID), tags.get(TAG_EXPIRES_AT), tags.get(TAG_LAUNCH),
    )


__all__ = [
    "FleetPool",
    "FleetStep",
    "ImageInfo",
    "InstanceTypeInfo",
    "InstanceView",
    "LaunchRequest",
    "LaunchResult",
    "LaunchTemplateRef",
    "ManagedResource",
    "Node",
    "managed_resource",
]
