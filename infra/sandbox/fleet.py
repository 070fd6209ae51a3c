"""moto's EC2 Fleet, made to launch what EC2 launches from a launch template.

moto 5's instant fleet builds its instances from a few fields of the template (image,
type, key, subnet, user data, tags) and drops the rest: the security groups (its
instances land in the VPC's default group), the metadata options (IMDSv1 stays on), the
block devices (an 8 GiB unencrypted gp2 root), the instance profile; and its spot
instances come from *persistent* spot requests that stay ``active`` after their instance
is gone.  EC2 launches an instant fleet's instance with the template's settings, exactly
as RunInstances with that template would, and an instant fleet's spot requests are
one-time.  While :func:`faithful_instant_fleets` is active (the sandbox cloud, in process
or its server), an instant fleet's instances are made by moto's own RunInstances path
with the template and the chosen override, like gpuflow's RunInstances launches; spot
ones without a lingering request.  Which override is chosen stays moto's (the first:
moto models neither capacity nor prices there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any


def _launch_instant(fleet: Any, weight_to_add: float, lifecycle: str) -> None:
    from moto.ec2.utils import convert_tag_spec

    backend = fleet.ec2_backend
    weight_map, added_weight = fleet.get_launch_spec_counts(weight_to_add)
    for launch_spec, count in weight_map.items():
        reference = launch_spec.launch_template_spec or {}
        template = backend.get_launch_template(reference["LaunchTemplateId"])
        data = dict(template.get_version(reference.get("Version", template.default_version_number)).data)
        data.update(launch_spec.overrides or {})
        profile = data.get("IamInstanceProfile") or {}
        kwargs: dict[str, Any] = {
            "instance_type": data["InstanceType"],
            "is_instance_type_default": False,
            "region_name": backend.region_name,
            "subnet_id": data.get("SubnetId"),
            "key_name": data.get("KeyName"),
            "security_group_ids": list(data.get("SecurityGroupIds") or []),
            "tags": convert_tag_spec(data.get("TagSpecifications") or []),
            "launch_template": {"LaunchTemplateId": template.id, "Version": str(reference.get("Version", ""))},
            "metadata_options": data.get("MetadataOptions") or {},
            "block_device_mappings": list(data.get("BlockDeviceMappings") or []),  # no default root beside it
            "instance_initiated_shutdown_behavior": data.get("InstanceInitiatedShutdownBehavior"),
            "iam_instance_profile_arn": profile.get("Arn"),
            "fleet_id": fleet.id,
        }
        if lifecycle == "spot":
            kwargs["instance_market_options"] = "spot"
            kwargs["lifecycle"] = "spot"
        reservation = backend.run_instances(data["ImageId"], count, data.get("UserData"), [], **kwargs)
        for instance in reservation.instances:
            if profile.get("Arn"):
                backend.associate_iam_instance_profile(instance_id=instance.id, iam_instance_profile_arn=profile["Arn"])
            if lifecycle == "spot":  # what Fleet.instances reads: no spot request lingers
                fleet.spot_requests.append(SimpleNamespace(instance=instance, launch_spec=launch_spec, id=None))
            else:
                fleet.on_demand_instances.append({"id": reservation.id, "instance": instance, "launch_spec": launch_spec})
    fleet.fulfilled_capacity += added_weight


@contextlib.contextmanager
def faithful_instant_fleets() -> Iterator[None]:
    """While active, moto (in this process) launches an instant fleet's instances with
    its launch template's settings (see the module's docstring); other fleets as before."""
    from unittest import mock

    from moto.ec2.models.fleets import Fleet

    original_spot, original_on_demand = Fleet.create_spot_requests, Fleet.create_on_demand_requests

    def create_spot_requests(self: Any, weight_to_add: float) -> Any:
        if self.fleet_type != "instant":
            return original_spot(self, weight_to_add)
        _launch_instant(self, weight_to_add, "spot")
        return self.spot_requests

    def create_on_demand_requests(self: Any, weight_to_add: float) -> None:
        if self.fleet_type != "instant":
            return original_on_demand(self, weight_to_add)
        _launch_instant(self, weight_to_add, "on-demand")
        return None

    with mock.patch.object(Fleet, "create_spot_requests", create_spot_requests), \
            mock.patch.object(Fleet, "create_on_demand_requests", create_on_demand_requests):
        yield


__all__ = ["faithful_instant_fleets"]
