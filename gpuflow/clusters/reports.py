"""What the cluster use cases report: a reconciled cluster's status, a down's and a reap's results."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from gpuflow.errors import CloudError, CredentialsError, GpuflowError
from gpuflow.records import Cluster

Progress = Callable[[str], None]


class ClusterState(str, enum.Enum):
    """What ``status``/``ls`` say a cluster is (its instances reconciled with the cloud)."""

    RUNNING = "running"
    PENDING = "pending"
    PARTIAL = "partial"  # its instances disagree (some running, some stopped or gone)
    STOPPED = "stopped"
    GONE = "gone"  # no instance of it is live
    CREATING = "creating"  # an `up` is in progress
    INTERRUPTED = "interrupted"  # an `up` crashed: `down` finishes it
    UNMANAGED = "unmanaged"  # this gpuflow's instances without a local record
    UNCHECKED = "unchecked"  # an AWS cluster listed where the sandbox is in effect: AWS not asked

    def __str__(self) -> str:
        return self.value



@dataclass(frozen=True)
class ClusterStatus:
    """A cluster reconciled with EC2, with its cost so far."""

    cluster: Cluster
    state: ClusterState
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
            "state": self.state.value,
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
class UncheckedPlace:
    """A place ``ls`` could not ask (AWS in a region, with a profile; or the sandbox), and why."""

    region: str
    profile: str | None
    sandbox: bool
    error: GpuflowError  # CredentialsError: no usable credentials; CloudError: unreachable, or failing
    recorded: tuple[str, ...] = ()  # the clusters recorded here for that place (listed as unchecked)

    @property
    def cloud(self) -> str:
        return ("the sandbox" if self.sandbox else "AWS") + (f" (profile {self.profile})" if self.profile else "")


@dataclass(frozen=True)
class ClusterListing:
    """What ``ls`` found: the clusters (those of a place it could not ask are listed from
    their records, as ``unchecked``), the places it could not ask, how many it could;
    iterating it gives the statuses."""

    statuses: tuple[ClusterStatus, ...] = ()
    unchecked_places: tuple[UncheckedPlace, ...] = ()
    checked_places: int = 0
    aws_left_to_sandbox: bool = False  # AWS clusters listed unasked because the sandbox is in effect

    def __iter__(self) -> Iterator[ClusterStatus]:
        return iter(self.statuses)

    def __len__(self) -> int:
        return len(self.statuses)

    def not_checked_lines(self, *, listed: bool = True) -> list[str]:
        """One line per reason: what could not be asked (places with the same reason together),
        and with ``listed`` which recorded clusters are therefore listed as unchecked."""
        by_reason: dict[tuple[str, str], list[UncheckedPlace]] = {}
        for place in self.unchecked_places:
            by_reason.setdefault((place.cloud, place.error.one_line()), []).append(place)
        lines = []
        for (cloud, reason), places in by_reason.items():
            line = f"{cloud} was not checked ({', '.join(sorted({place.region for place in places}))}): {reason}"
            recorded = sorted({name for place in places for name in place.recorded})
            if listed and recorded:
                line += f"; its clusters recorded here ({', '.join(recorded)}) are listed as unchecked"
            lines.append(line)
        return lines

    def failure(self) -> GpuflowError | None:
        """The error ``ls`` ends with when it could ask no place at all (None when it asked one):
        of the first place's kind (credentials: exit 3; the cloud: exit 5), saying what was not checked."""
        if self.checked_places or not self.unchecked_places:
            return None
        first = self.unchecked_places[0].error
        kind = CredentialsError if isinstance(first, CredentialsError) else CloudError
        return kind("; ".join(self.not_checked_lines(listed=False)))


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
