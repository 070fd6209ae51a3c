"""Cluster use cases: up, status, ls, down, reap — and the cloud probe the SSH layer is given.

One module per job:

* :mod:`~gpuflow.clusters.spec` — the spec: command line over project config over defaults, validated;
* :mod:`~gpuflow.clusters.where` — the sandbox choice, the configured region, the provisioner factory, hints,
  and :func:`cloud_probe` (what :mod:`gpuflow.nodes` may ask the cloud);
* :mod:`~gpuflow.clusters.record` — the local record (its :class:`Phase`), its store, reading and writing it;
* :mod:`~gpuflow.clusters.reports` — what the use cases return (:class:`ClusterStatus`, its :class:`ClusterState`, ...);
* :mod:`~gpuflow.clusters.owner` — this gpuflow's owner id, whose tagged resources are, unknown names explained;
* :mod:`~gpuflow.clusters.launch` — ``up``, with its name claim and rollback;
* :mod:`~gpuflow.clusters.reconcile` — ``status`` and ``ls``: records reconciled with the cloud, prices, cost;
* :mod:`~gpuflow.clusters.teardown` — ``down`` and ``down --all``, tombstones;
* :mod:`~gpuflow.clusters.reaper` — ``reap``;
* :mod:`~gpuflow.clusters.switch` — the dead-man's switch's status on each node, for ``status``.

Every use case takes ``provisioner_factory`` (region, profile, sandbox ->
:class:`gpuflow.provisioner.Provisioner`) so tests can inject one that never
sleeps; the default is the cloud port's (:func:`gpuflow.provisioner.open_provisioner`,
which imports boto3 only when it opens one, so ``gpuflow --help`` stays fast).  On-demand $/h comes from the
dated table ``infra/prices.json``; spot from the spot price history.
"""

from __future__ import annotations

from gpuflow.clusters.launch import up
from gpuflow.clusters.owner import explain_unknown, owner_id, whose
from gpuflow.clusters.reaper import reap
from gpuflow.clusters.reconcile import list_clusters, status
from gpuflow.clusters.record import _store  # noqa: F401 - tests read the store through it
from gpuflow.clusters.record import Phase, get_cluster, key_file_path, known_clusters, resolve_cluster_name
from gpuflow.clusters.reports import ClusterListing, ClusterState, ClusterStatus, DownReport, ReapItem, ReapReport, UncheckedPlace
from gpuflow.clusters.spec import default_region, normalise_cidr, resolve_spec, validate_spec
from gpuflow.clusters.teardown import down, down_all
from gpuflow.clusters.where import cloud_probe, command_hint, console_output, instance_state, sandbox_in_effect

__all__ = [
    "ClusterListing",
    "ClusterState",
    "ClusterStatus",
    "DownReport",
    "Phase",
    "ReapItem",
    "ReapReport",
    "UncheckedPlace",
    "cloud_probe",
    "command_hint",
    "console_output",
    "default_region",
    "down",
    "down_all",
    "explain_unknown",
    "get_cluster",
    "instance_state",
    "key_file_path",
    "known_clusters",
    "list_clusters",
    "normalise_cidr",
    "owner_id",
    "reap",
    "resolve_cluster_name",
    "resolve_spec",
    "sandbox_in_effect",
    "status",
    "up",
    "validate_spec",
    "whose",
]
