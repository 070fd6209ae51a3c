"""The tunnels open on this machine (`gpuflow forward`, `gpuflow notebook`), for `gpuflow status`.

Each gpuflow process that holds a tunnel writes one record,
``$GPUFLOW_HOME/state/tunnels/<pid>.json``, with its process identity
(:func:`gpuflow.procs.identity`: a pid alone is never proof), and deletes it
when it ends.  A record whose process is gone (killed, crashed) or is another
process now is stale: it is not listed, and is deleted when seen.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpuflow import procs
from gpuflow.config import gpuflow_home
from gpuflow.state import StateStore
from gpuflow.tunnels.ports import Forward


class TunnelKind(enum.Enum):
    FORWARD = "forward"
    NOTEBOOK = "notebook"
    TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class OpenTunnel:
    """A tunnel some gpuflow process on this machine holds open."""

    cluster: str
    instance_id: str
    kind: TunnelKind
    forwards: tuple[Forward, ...]
    pid: int
    identity: str
    url: str | None = None  # what to open (a notebook's, with its token)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster, "instance_id": self.instance_id, "kind": self.kind.value,
            "forwards": [[forward.remote, forward.local] for forward in self.forwards],
            "pid": self.pid, "identity": self.identity, "url": self.url,
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> OpenTunnel:
        return cls(
            cluster=str(document["cluster"]), instance_id=str(document["instance_id"]),
            kind=TunnelKind(document["kind"]),
            forwards=tuple(Forward(int(remote), int(local)) for remote, local in document["forwards"]),
            pid=int(document["pid"]), identity=str(document["identity"]), url=document.get("url"),
        )


def _store() -> StateStore:
    return StateStore(gpuflow_home(), "tunnels", shape=lambda name, document: OpenTunnel.from_dict(document))


@contextlib.contextmanager
def registered(
    cluster: str, instance_id: str, kind: TunnelKind, forwards: Sequence[Forward], url: str | None = None
) -> Iterator[OpenTunnel | None]:
    """Record this process's tunnel while the block runs (None when this process's identity cannot be read)."""
    pid = os.getpid()
    identity = procs.identity(pid)
    if identity is None:
        yield None
        return
    tunnel = OpenTunnel(cluster, instance_id, kind, tuple(forwards), pid, identity, url)
    store = _store()
    store.put(str(pid), tunnel.to_dict())
    try:
        yield tunnel
    finally:
        store.delete(str(pid))


def open_tunnels(cluster: str | None = None) -> list[OpenTunnel]:
    """The tunnels whose process still runs (of ``cluster``, or all); stale records are deleted."""
    store = _store()
    documents, _damaged = store.scan()
    found: list[OpenTunnel] = []
    for name, document in documents.items():
        tunnel = OpenTunnel.from_dict(document)
        if procs.identity(tunnel.pid) != tunnel.identity:
            store.delete(name)
            continue
        if cluster is None or tunnel.cluster == cluster:
            found.append(tunnel)
    return sorted(found, key=lambda tunnel: tunnel.pid)


def describe(tunnels: Sequence[OpenTunnel]) -> list[str]:
    """`gpuflow status`'s lines: each open tunnel, what it reaches and the gpuflow process holding it."""
    lines = []
    for tunnel in tunnels:
        ports = ", ".join(f"{forward.url} -> port {forward.remote}" for forward in tunnel.forwards)
        shown = tunnel.url if tunnel.url and tunnel.kind is not TunnelKind.FORWARD else ports
        where = "" if tunnel.instance_id == "local" else f" on {tunnel.instance_id}"
        lines.append(f"open {tunnel.kind.value}: {shown}{where} (gpuflow pid {tunnel.pid})")
    return lines
