"""``gpuflow sandbox interrupt``: a simulated spot interruption of a sandbox node.

The node's own metadata service (a loopback IMDSv2, :mod:`infra.sandbox.imds`,
hosted by the process that hosts the sandbox's moto) starts serving the
instance-action notice at once; after ``notice_seconds`` that process ends the
instance as EC2 reclaims a spot instance: its processes killed, its directory
deleted, terminated in moto with the state reason ``Server.SpotInstanceTermination``.

The notice is served once every run on the node whose job is running has its
spot watcher settled (watching the metadata service, or off where none answers;
at most :data:`WATCHER_SETTLE_SECONDS`): on EC2 a notice comes two minutes ahead
and the watcher, started with the job, is long watching; a sandbox notice of a
second or two given as a job starts would otherwise race the watcher's start, and
the run would end as a lost instance instead of an interrupted one.

This use case only writes the request into the node's directory (atomically,
once): so it works whichever process hosts the node -- the detached sandbox
server of ``gpuflow up --sandbox``, or the in-process cloud of
``run --up --sandbox`` or of the pytest fixture, which another process cannot
reach -- and it never starts a sandbox server of its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from gpuflow import nodes, procs
from gpuflow.clusters.record import get_cluster
from gpuflow.clusters.where import command_hint
from gpuflow.errors import InstanceGone, UsageError

DEFAULT_NOTICE_SECONDS = 10.0
MAX_NOTICE_SECONDS = 3600.0
WATCHER_SETTLE_SECONDS = 30.0  # the longest a notice waits for the node's runs' watchers


@dataclass(frozen=True)
class Interruption:
    """What ``gpuflow sandbox interrupt`` set going."""

    cluster: str
    instance_id: str
    action: str
    notice_seconds: float
    requested_at: float  # epoch seconds: the notice is served from then on
    terminate_at: float  # epoch seconds: the instance is terminated then
    notice: dict[str, str]  # what spot/instance-action answers

    def to_json(self) -> dict[str, object]:
        return {
            "cluster": self.cluster, "instance_id": self.instance_id, "action": self.action,
            "notice_seconds": self.notice_seconds, "requested_at": self.requested_at,
            "terminate_at": self.terminate_at, "notice": dict(self.notice),
        }


def validate_notice_seconds(value: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--notice-seconds {value!r} is not a number") from exc
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_NOTICE_SECONDS:
        raise UsageError(
            f"--notice-seconds {value!r} is out of range",
            hint=f"give 0 to {MAX_NOTICE_SECONDS:g} seconds (EC2 gives 120)",
        )
    return seconds


def interrupt_node(
    name: str, instance_id: str | None = None, *, notice_seconds: float = DEFAULT_NOTICE_SECONDS
) -> Interruption:
    """Interrupt the node ``instance_id`` (default: the head) of sandbox cluster ``name``
    as a spot reclaim would; returns at once, with the notice being served."""
    from infra.sandbox.imds import InterruptionRequest, endpoint_answers, read_endpoint, read_request, write_request

    seconds = validate_notice_seconds(notice_seconds)
    cluster = get_cluster(name)
    if not cluster.sandbox:
        raise UsageError(
            f"cluster {cluster.name!r} is not a sandbox cluster: only sandbox instances can be interrupted here",
            hint="a real spot interruption comes from EC2; rehearse it on a cluster started with --sandbox",
        )
    node = nodes.select_node(cluster, instance_id)
    directory = nodes.sandbox_directory(cluster, node)
    gone_hint = (f"{command_hint(f'status {cluster.name}', True)} shows what happened to it; "
                 f"{command_hint(f'down {cluster.name}', True)} forgets it")
    if not directory.is_dir():
        raise InstanceGone(
            f"instance {node.instance_id} of sandbox cluster {cluster.name!r} is already terminated "
            "(or has never been reached: no sandbox instance directory)",
            hint=gone_hint,
        )
    pending = read_request(directory)
    if pending is not None:
        raise UsageError(
            f"instance {node.instance_id} of sandbox cluster {cluster.name!r} is already being interrupted "
            f"(terminated at {pending.notice['time']})",
            hint=gone_hint,
        )
    endpoint = read_endpoint(directory)
    if endpoint is None or not endpoint_answers(endpoint):
        raise UsageError(
            f"no metadata service answers for instance {node.instance_id} of sandbox cluster {cluster.name!r}: "
            "the process that hosts its sandbox cloud has ended, or started without one",
            hint=f"{command_hint(f'down {cluster.name}', True)} and {command_hint(f'up {cluster.name}', True)} "
            "start a node that can be interrupted",
        )
    wait_for_watchers(directory)
    now = time.time()
    request = InterruptionRequest(instance_id=node.instance_id, requested_at=now, terminate_at=now + seconds)
    try:
        write_request(directory, request)
    except FileExistsError as exc:
        raise UsageError(
            f"instance {node.instance_id} of sandbox cluster {cluster.name!r} is already being interrupted",
            hint=gone_hint,
        ) from exc
    except OSError as exc:  # the directory went meanwhile: terminated
        raise InstanceGone(
            f"instance {node.instance_id} of sandbox cluster {cluster.name!r} is already terminated", hint=gone_hint
        ) from exc
    return Interruption(
        cluster=cluster.name, instance_id=node.instance_id, action=request.action, notice_seconds=seconds,
        requested_at=request.requested_at, terminate_at=request.terminate_at, notice=request.notice,
    )


def wait_for_watchers(directory: Path, timeout: float = WATCHER_SETTLE_SECONDS) -> None:
    """Return once every run under the node ``directory`` whose job still runs (its proven
    pid) has its spot watcher's state written (:data:`gpuflow.procs.WATCHER_STATE`), or after
    ``timeout`` seconds: a watcher that never settles delays a notice, never stops it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        unsettled = [run for run in sorted((directory / "runs").glob("*"))
                     if not (run / procs.WATCHER_STATE).exists() and procs.proven(str(run / procs.JOB_RECORD))]
        if not unsettled:
            return
        time.sleep(0.05)


__all__ = ["DEFAULT_NOTICE_SECONDS", "Interruption", "interrupt_node", "validate_notice_seconds", "wait_for_watchers"]
