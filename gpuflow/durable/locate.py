"""Which durable store a cluster's runs use: the account stack's bucket its instances were launched to reach."""

from __future__ import annotations

from gpuflow.durable import DurableStore
from gpuflow.records import Cluster
from infra.account_stack import STACK_NAME, role_name


def store_for(cluster: Cluster) -> DurableStore | None:
    """The store ``cluster``'s runs upload to, or None (nothing is durable; everything works as before).

    Read from the cluster's record, not looked up again: ``up`` recorded the account
    stack's bucket and instance profile when it launched the instances with the role
    (``gpuflow setup`` deployed in the region).  A cluster launched before the stack
    existed holds no role, so its instances could not upload: its runs are not durable
    even once the stack is there."""
    if not (cluster.durable_bucket and cluster.instance_profile_arn):
        return None
    return DurableStore(
        region=cluster.region,
        stack_name=STACK_NAME,
        bucket=cluster.durable_bucket,
        role_name=role_name(cluster.region),
        instance_profile_name=cluster.instance_profile_arn.rsplit("/", 1)[-1],
        instance_profile_arn=cluster.instance_profile_arn,
    )
