"""The local cluster record: its phase, its bookkeeping, the store it lives in, reading and writing it.

AWS tags are the truth; ``state/clusters/<name>.json`` under the gpuflow home
is a cache, written atomically under the store's lock.  Each record carries a
:class:`Phase` (on disk the strings ``creating``, ``up``, ``deleted``; a
record without one is ``up``).
"""

from __future__ import annotations

import datetime
import enum
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuflow.clusters.where import command_hint, sandbox_in_effect
from gpuflow.config import gpuflow_home, project_config
from gpuflow.errors import ClusterNotFound, DamagedRecord, UsageError
from gpuflow.records import Cluster, check_shape
from gpuflow.state import StateStore, validate_name, warn_damaged


class Phase(str, enum.Enum):
    """Where a cluster record is in its life (the ``phase`` key of its JSON)."""

    CREATING = "creating"  # an `up` is in progress, or crashed (`down` finishes it)
    UP = "up"
    DELETED = "deleted"  # a tombstone: a second `down` knows the cluster is already gone

    def __str__(self) -> str:
        return self.value


def phase_of(document: dict[str, Any]) -> Phase:
    """A (shape-checked) record's phase; records written before phases existed are ``up``."""
    return Phase(document.get("phase", Phase.UP.value))


def _live(document: dict[str, Any] | None) -> bool:
    """A record of a cluster that is not deleted (None: no record)."""
    return document is not None and phase_of(document) is not Phase.DELETED



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

    phase: str = Phase.UP.value  # the JSON shape; its value is checked against Phase below
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
    if document.get("phase", Phase.UP.value) not in {phase.value for phase in Phase}:
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


def _write(store: StateStore, cluster: Cluster, phase: Phase, launch_id: str | None, **extra: Any) -> None:
    document = cluster.to_dict()
    document.update(phase=phase.value, launch_id=launch_id, pid=os.getpid(), host=socket.gethostname(), **extra)
    store.put(cluster.name, document)


def _save(store: StateStore, cluster: Cluster, phase: Phase, launch_id: str | None, **extra: Any) -> None:
    with store.locked():
        _write(store, cluster, phase, launch_id, **extra)



def resolve_cluster_name(name: str | None = None, *, project_dir: Path | None = None) -> str:
    """``name``; else the project config's ``cluster``; else the only cluster
    in the local state."""
    if name:
        return validate_name(name, "cluster name")
    configured = project_config(project_dir).cluster_name
    if configured:
        return validate_name(configured, "cluster name")
    names = [key for key, document in _store().all().items() if _live(document)]
    if len(names) == 1:
        return names[0]
    if not names:
        raise ClusterNotFound("no clusters", hint=f"start one with {command_hint('up', sandbox_in_effect(project_dir=project_dir))}")
    raise UsageError(f"several clusters exist ({', '.join(names)}): name one")


def get_cluster(name: str | None = None, *, project_dir: Path | None = None) -> Cluster:
    """The cached record of cluster ``name`` (no AWS call); ClusterNotFound
    when gpuflow knows no live cluster of that name."""
    cluster_name = resolve_cluster_name(name, project_dir=project_dir)
    document = _store().get(cluster_name)
    if not _live(document):
        in_sandbox = sandbox_in_effect(project_dir=project_dir)
        raise ClusterNotFound(
            f"no cluster named {cluster_name!r}",
            hint=f"see {command_hint('ls', in_sandbox)}, or start it with {command_hint('up', in_sandbox)}",
        )
    return Cluster.from_dict(document)


def known_clusters() -> list[Cluster]:
    """Every cluster with a live record here, from the cache alone (no cloud call:
    ``ssh-config`` must work offline and fast); a damaged record is warned about
    and left out (it concerns its own name only)."""
    store = _store()
    clusters = []
    for name in store.names():
        try:
            document = store.get(name)
        except DamagedRecord as exc:
            warn_damaged(exc)
            continue
        if _live(document):
            clusters.append(Cluster.from_dict(document))
    return clusters
