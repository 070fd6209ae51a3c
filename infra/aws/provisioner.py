"""The EC2 provisioner: one class for one region, composed of account set-up, images and instances.

This is the AWS half of ``gpuflow up/status/down/reap``; the use cases in
:mod:`gpuflow.clusters` drive it (through the protocol :class:`infra.port.Provisioner`)
and own the bookkeeping (state cache, local key files, rollback order).  Every
call goes through :class:`~infra.aws.client.AwsApi` (retries, one-line errors).
Its parts, like SkyPilot's ``sky/provision/aws``: :mod:`infra.aws.config`
(key pairs, security groups, subnets, the spot role), :mod:`infra.aws.image`
(AMI and instance type), :mod:`infra.aws.instance` (launch, describe, wait,
terminate, console, prices), :mod:`infra.aws.fleet` (EC2 Fleet launches, launch templates), :mod:`infra.aws.stack` (the account stack of durable runs); what ``reap`` lists spans them all, so it is here.

Everything gpuflow creates carries the tags of :mod:`infra.tags`: AWS tags are
the source of truth, so ``down`` and ``reap`` can find what a crashed or
forgotten ``up`` left, without any local state.
"""

from __future__ import annotations

from collections.abc import Callable

from infra.aws.client import AwsApi
from infra.aws.config import AccountSetup
from infra.aws.fleet import Fleets
from infra.aws.image import Images
from infra.aws.instance import Instances
from infra.aws.stack import AccountStacks
from infra.records import ManagedResource, managed_resource
from infra.tags import TAG_MANAGED, tag_dict


class Ec2Provisioner(AccountSetup, Images, Instances, Fleets, AccountStacks):
    """EC2 operations for one region.  ``sleep``, ``poll_seconds`` and
    ``timeout_seconds`` are injectable so tests never wait."""

    def __init__(
        self,
        api: AwsApi,
        *,
        poll_seconds: float = 5.0,
        timeout_seconds: float = 1200.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.api = api
        self.region = api.target.region
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        self._clock = clock or time.monotonic
        self._latest_console_refused: set[str] = set()

    def managed_resources(self) -> list[ManagedResource]:
        """Everything in the region tagged ``gpuflow:managed=true`` that still costs or clutters."""
        managed = [{"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]}]
        resource = managed_resource
        resources = [
            resource("instance", view.instance_id, view.tags, view.state, view.instance_type) for view in self.find_instances()
        ]
        for request in self.api.paginate(
            "ec2",
            "describe_spot_instance_requests",
            "SpotInstanceRequests",
            Filters=managed + [{"Name": "state", "Values": ["open", "active"]}],
        ):
            resources.append(resource("spot-request", request["SpotInstanceRequestId"], tag_dict(request.get("Tags")), request.get("State")))
        for volume in self.api.paginate(
            "ec2", "describe_volumes", "Volumes", Filters=managed + [{"Name": "status", "Values": ["available"]}]
        ):
            resources.append(resource("volume", volume["VolumeId"], tag_dict(volume.get("Tags")), volume.get("State"), f"{volume.get('Size')} GiB"))
        for group in self.api.paginate("ec2", "describe_security_groups", "SecurityGroups", Filters=managed):
            resources.append(resource("security-group", group["GroupId"], tag_dict(group.get("Tags")), None, group.get("GroupName")))
        for key_pair in self.api.call("ec2", "describe_key_pairs", Filters=managed).get("KeyPairs", []):
            resources.append(resource("key-pair", key_pair["KeyName"], tag_dict(key_pair.get("Tags"))))
        resources += self.find_launch_templates()  # a relaunch's, left when deleting it failed
        return resources


__all__ = ["Ec2Provisioner"]
