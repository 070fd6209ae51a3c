"""Which durable store a cluster's runs use: the account stack's bucket in the cluster's region, if deployed."""

from __future__ import annotations

from gpuflow.durable import DurableStore
from gpuflow.records import Cluster


def store_for(cluster: Cluster) -> DurableStore | None:
    """The store of ``cluster``'s region, or None (nothing is durable; everything works as before).

    The account stack (``gpuflow setup``) provides the lookup; until it is wired in here
    no store is found.  Tests replace this function with one returning a bucket they built."""
    return None
