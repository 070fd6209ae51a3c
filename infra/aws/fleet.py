"""EC2 Fleet (type ``instant``) launches from a launch template gpuflow makes, and those templates' lifecycle.

One part of :class:`infra.aws.provisioner.Ec2Provisioner` (:class:`Fleets`).  The
launch template carries exactly the settings of ``up``'s RunInstances (one builder:
:func:`infra.aws.instance.launch_settings`); the fleet call carries the pools
(type x subnet) as the template's overrides, and EC2 picks one: for spot by
``price-capacity-optimized`` (the pools with the most spare capacity, the cheapest of
them), on-demand by the overrides' priority.  Every node of one call lands in one
pool (``SingleInstanceType``/``SingleAvailabilityZone``) or none does
(``MinTargetCapacity``): a cluster is never split across zones or half launched.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from infra.aws.client import CAPACITY_CODES, AwsApi, AwsCallError, AwsCapacityError
from infra.aws.instance import client_token, launch_settings
from infra.errors import CapacityError, CloudError
from infra.records import FleetStep, LaunchRequest, LaunchResult, LaunchTemplateRef, ManagedResource, managed_resource
from infra.tags import TAG_CLUSTER, TAG_MANAGED, tag_dict, tag_list

# EC2 Fleet's own capacity answers in an instant fleet's Errors, besides the RunInstances codes.
FLEET_CAPACITY_CODES = CAPACITY_CODES | frozenset(
    {"InsufficientFreeAddressesInSubnet", "UnfulfillableCapacity", "InsufficientInstanceCapacityForOverrides"}
)
# The fleet needs its service-linked role; gpuflow's policy deliberately cannot create roles.
FLEET_ROLE_COMMAND = "aws iam create-service-linked-role --aws-service-name ec2fleet.amazonaws.com"
TEMPLATE_GONE_CODES = frozenset({"InvalidLaunchTemplateId.NotFound", "InvalidLaunchTemplateName.NotFoundException",
                                 "InvalidLaunchTemplateId.Malformed"})


def launch_template_data(request: LaunchRequest, market: str) -> dict[str, Any]:
    """The launch template's data: :func:`launch_settings` (the user data base64-encoded,
    as a template needs it), and for spot the tags of the spot request too."""
    data = launch_settings(request)
    data["UserData"] = base64.b64encode(request.user_data.encode()).decode("ascii")
    if market == "spot":
        data["TagSpecifications"].append({"ResourceType": "spot-instances-request", "Tags": tag_list(request.tags)})
    return data


class Fleets:
    """Launch templates and instant fleets of one region (mixed into the provisioner,
    whose :meth:`terminate` and :meth:`wait_until` end a partly launched fleet)."""

    api: AwsApi
    region: str
    terminate: Callable[[Sequence[str]], None]
    wait_until: Callable[..., Any]

    def create_launch_template(
        self, name: str, request: LaunchRequest, market: str, tags: dict[str, str]
    ) -> LaunchTemplateRef:
        """A launch template ``name`` with ``request``'s settings for ``market``, itself tagged
        with ``tags`` (its owner, cluster, launch id, created-at: ``down`` and ``reap`` find it)."""
        response = self.api.call(
            "ec2", "create_launch_template",
            LaunchTemplateName=name,
            VersionDescription=f"gpuflow relaunch of {request.cluster_name}",
            LaunchTemplateData=launch_template_data(request, market),
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tag_list(tags)}],
            ClientToken=client_token(request.cluster_name, request.launch_id, f"template-{market}"),
        )
        template = response["LaunchTemplate"]
        return LaunchTemplateRef(template["LaunchTemplateId"], template["LaunchTemplateName"])

    def delete_launch_template(self, template_id: str) -> None:
        """Delete a launch template (tolerates "already gone")."""
        try:
            self.api.call("ec2", "delete_launch_template", LaunchTemplateId=template_id)
        except AwsCallError as exc:
            if exc.code not in TEMPLATE_GONE_CODES:
                raise

    def find_launch_templates(self, cluster: str | None = None) -> list[ManagedResource]:
        """Launch templates tagged by gpuflow (of one cluster), with their owner tags."""
        filters = [{"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]}]
        if cluster is not None:
            filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
        templates = self.api.paginate("ec2", "describe_launch_templates", "LaunchTemplates", Filters=filters)
        return [
            managed_resource("launch-template", template["LaunchTemplateId"], tag_dict(template.get("Tags")), None,
                             template.get("LaunchTemplateName"))
            for template in templates
        ]

    def launch_fleet(
        self,
        template: LaunchTemplateRef,
        step: FleetStep,
        request: LaunchRequest,
        *,
        on_attempt: Callable[[str], None] | None = None,
    ) -> LaunchResult:
        """One CreateFleet (type ``instant``) of ``request.count`` nodes over ``step``'s pools.
        :class:`CapacityError` when EC2 had no capacity in any of them (a partial launch
        is terminated first, waited for); :class:`CloudError` when it refused otherwise."""
        if on_attempt:
            on_attempt(f"launching {request.count} x {step}")
        zone_of = {pool.subnet_id: pool.availability_zone for pool in step.pools}
        overrides = [
            {"InstanceType": pool.instance_type, "SubnetId": pool.subnet_id, "Priority": float(index)}
            for index, pool in enumerate(step.pools)
        ]
        single = {"SingleInstanceType": True, "SingleAvailabilityZone": True, "MinTargetCapacity": request.count}
        params: dict[str, Any] = {
            "Type": "instant",
            "LaunchTemplateConfigs": [{
                "LaunchTemplateSpecification": {"LaunchTemplateId": template.template_id, "Version": "$Latest"},
                "Overrides": overrides,
            }],
            "TargetCapacitySpecification": {"TotalTargetCapacity": request.count, "DefaultTargetCapacityType": step.market},
            "TagSpecifications": [{"ResourceType": "fleet", "Tags": tag_list(request.tags)}],
            "ClientToken": client_token(request.cluster_name, request.launch_id, f"fleet-{step}"),
        }
        if step.market == "spot":
            params["SpotOptions"] = {
                "AllocationStrategy": "price-capacity-optimized", "InstanceInterruptionBehavior": "terminate", **single,
            }
        else:
            params["OnDemandOptions"] = {"AllocationStrategy": "prioritized", **single}
        try:
            response = self.api.call("ec2", "create_fleet", **params)
        except AwsCapacityError as exc:
            raise CapacityError(f"{step}: {exc.code}") from exc
        ids: list[str] = []
        zone = None
        launched_type = None
        for launched in response.get("Instances") or []:
            ids.extend(launched.get("InstanceIds") or [])
            chosen = (launched.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
            zone = zone or chosen.get("AvailabilityZone") or zone_of.get(chosen.get("SubnetId", ""))
            launched_type = launched_type or launched.get("InstanceType") or chosen.get("InstanceType")
        errors = response.get("Errors") or []
        codes = sorted({str(error.get("ErrorCode") or "unknown") for error in errors})
        if ids and len(ids) >= request.count:
            return LaunchResult(
                tuple(ids), zone or step.pools[0].availability_zone, step.market,
                tuple(f"{step}: {code}" for code in codes), launched_type or step.pools[0].instance_type,
            )
        if ids:  # fewer than asked, despite MinTargetCapacity: never keep a partial cluster
            with contextlib.suppress(CloudError):
                self.terminate(ids)
                self.wait_until(ids, "terminated")
            raise CapacityError(f"{step}: {len(ids)} of {request.count} launched ({', '.join(codes) or 'no error'}), terminated")
        refusals = [error for error in errors if str(error.get("ErrorCode")) not in FLEET_CAPACITY_CODES]
        if refusals:
            code = str(refusals[0].get("ErrorCode"))
            role = "ServiceLinkedRole" in code or "service-linked" in str(refusals[0].get("ErrorMessage", "")).lower()
            raise CloudError(
                f"EC2 Fleet refused to launch {step}: {code}: {refusals[0].get('ErrorMessage', '')}".rstrip(": "),
                hint=f"create EC2 Fleet's role once: {FLEET_ROLE_COMMAND}" if role else None,
            )
        raise CapacityError(f"{step}: {', '.join(codes) or 'no capacity'}")


__all__ = ["FLEET_CAPACITY_CODES", "FLEET_ROLE_COMMAND", "Fleets", "launch_template_data"]
