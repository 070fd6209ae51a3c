"""Account and network set-up in one region: key pairs, security groups, the default VPC's subnets, the spot role.

What an ``up`` creates or checks around its instances, and what ``down``
deletes after them (:class:`AccountSetup`, one part of
:class:`infra.aws.provisioner.Ec2Provisioner`; the others are
:mod:`infra.aws.image` and :mod:`infra.aws.instance`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from infra.aws.client import AwsApi, AwsCallError, known_regions
from infra.errors import CloudError, CredentialsError, UsageError
from infra.port import WORKER_PORT_RANGE
from infra.records import ManagedResource, managed_resource
from infra.tags import TAG_CLUSTER, TAG_MANAGED, tag_dict, tag_list

# Spot launches through the API need this service-linked role in the account
# (AWS creates it by itself only for spot requests made in the console).
SPOT_SERVICE_LINKED_ROLE = "AWSServiceRoleForEC2Spot"

CREATE_SPOT_ROLE_COMMAND = "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com"


class AccountSetup:
    """Key pairs, security groups, subnets and the spot role of one region.
    Every call goes through ``api``; ``poll_seconds``, ``timeout_seconds`` and
    ``_clock`` (the provisioner's) bound the wait for a security group to go."""

    api: AwsApi
    region: str
    poll_seconds: float
    timeout_seconds: float
    _clock: Callable[[], float]

    @staticmethod
    def validate_region(region: str) -> None:
        """Refuse a region botocore does not know (no network call)."""
        if region not in known_regions():
            raise UsageError(
                f"unknown AWS region {region!r}",
                hint="use a region name such as us-east-1 or eu-west-1 (`aws ec2 describe-regions`)",
            )

    def spot_role_exists(self) -> bool | None:
        """Whether the account has the spot service-linked role: True, False,
        or None when this identity may not ask (``iam:GetRole`` denied)."""
        try:
            self.api.call("iam", "get_role", RoleName=SPOT_SERVICE_LINKED_ROLE)
        except AwsCallError as exc:
            if exc.code in ("NoSuchEntity", "NoSuchEntityException"):
                return False
            raise
        except CredentialsError as exc:
            if getattr(exc, "code", "") in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
                return None
            raise
        return True

    def create_key_pair(self, key_name: str, tags: dict[str, str]) -> str:
        """Create an ed25519 key pair; return its private key (OpenSSH PEM)."""
        response = self.api.call(
            "ec2",
            "create_key_pair",
            KeyName=key_name,
            KeyType="ed25519",
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": tag_list(tags)}],
        )
        return response["KeyMaterial"]

    def delete_key_pair(self, key_name: str) -> None:
        try:
            self.api.call("ec2", "delete_key_pair", KeyName=key_name)
        except AwsCallError as exc:
            if exc.code != "InvalidKeyPair.NotFound":
                raise

    def key_pair_exists(self, key_name: str) -> bool:
        try:
            return bool(self.api.call("ec2", "describe_key_pairs", KeyNames=[key_name]).get("KeyPairs"))
        except AwsCallError as exc:
            if exc.code == "InvalidKeyPair.NotFound":
                return False
            raise

    def default_vpc(self) -> str:
        vpcs = self.api.call("ec2", "describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}]).get("Vpcs", [])
        if not vpcs:
            raise CloudError(
                f"region {self.region} has no default VPC",
                hint="create one with `aws ec2 create-default-vpc` or use another --region",
            )
        return vpcs[0]["VpcId"]

    def create_security_group(self, group_name: str, description: str, vpc_id: str, tags: dict[str, str]) -> str:
        response = self.api.call(
            "ec2",
            "create_security_group",
            GroupName=group_name,
            Description=description,
            VpcId=vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(tags)}],
        )
        return response["GroupId"]

    def authorize_ssh(self, group_id: str, cidr: str, description: str) -> None:
        """The group's one ingress rule: TCP 22 from ``cidr``."""
        is_v6 = ":" in cidr
        permission: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
        if is_v6:
            permission["Ipv6Ranges"] = [{"CidrIpv6": cidr, "Description": description}]
        else:
            permission["IpRanges"] = [{"CidrIp": cidr, "Description": description}]
        self.api.call("ec2", "authorize_security_group_ingress", GroupId=group_id, IpPermissions=[permission])

    def authorize_workers(self, group_id: str, description: str) -> None:
        """A multi-node cluster's second rule: TCP :data:`WORKER_PORT_RANGE` from the same
        security group only (a self-referencing rule, never an address range): its nodes
        reach each other's workers, nothing outside the group reaches them."""
        low, high = WORKER_PORT_RANGE
        permission = {
            "IpProtocol": "tcp",
            "FromPort": low,
            "ToPort": high,
            "UserIdGroupPairs": [{"GroupId": group_id, "Description": description}],
        }
        self.api.call("ec2", "authorize_security_group_ingress", GroupId=group_id, IpPermissions=[permission])

    def delete_security_group(self, group_id: str) -> None:
        """Delete, waiting out DependencyViolation while instances shut down."""
        deadline = self._clock() + self.timeout_seconds
        while True:
            try:
                self.api.call("ec2", "delete_security_group", GroupId=group_id)
                return
            except AwsCallError as exc:
                if exc.code == "InvalidGroup.NotFound":
                    return
                if exc.code != "DependencyViolation" or self._clock() >= deadline:
                    raise
            self.api.sleep(self.poll_seconds)

    def launch_subnets(self, vpc_id: str, zones: Sequence[str]) -> tuple[tuple[str, str], ...]:
        """The default VPC's default subnet of each zone in ``zones``, in that order."""
        subnets = self.api.call(
            "ec2",
            "describe_subnets",
            Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default-for-az", "Values": ["true"]}],
        ).get("Subnets", [])
        by_zone = {subnet["AvailabilityZone"]: subnet["SubnetId"] for subnet in subnets}
        ordered = tuple((by_zone[zone], zone) for zone in zones if zone in by_zone)
        if not ordered:
            raise CloudError(
                f"the default VPC of {self.region} has no subnet in a zone offering the instance type ({', '.join(zones)})",
                hint="create default subnets (`aws ec2 create-default-subnet`) or use another --region",
            )
        return ordered

    def find_cluster_resources(self, cluster: str) -> tuple[list[str], list[str]]:
        """(security group ids, key pair names) tagged as created for ``cluster``, by anyone."""
        resources = self.cluster_resources(cluster)
        return (
            [resource.resource_id for resource in resources if resource.kind == "security-group"],
            [resource.resource_id for resource in resources if resource.kind == "key-pair"],
        )

    def cluster_resources(self, cluster: str) -> list[ManagedResource]:
        """The security groups and key pairs tagged as created for ``cluster``, with
        their owner tags (a name alone does not say whose they are)."""
        filters = [
            {"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]},
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
        ]
        groups = self.api.paginate("ec2", "describe_security_groups", "SecurityGroups", Filters=filters)
        keys = self.api.call("ec2", "describe_key_pairs", Filters=filters).get("KeyPairs", [])
        return [
            managed_resource("security-group", group["GroupId"], tag_dict(group.get("Tags")), None, group.get("GroupName"))
            for group in groups
        ] + [managed_resource("key-pair", key["KeyName"], tag_dict(key.get("Tags"))) for key in keys]


__all__ = ["AccountSetup", "CREATE_SPOT_ROLE_COMMAND", "SPOT_SERVICE_LINKED_ROLE", "WORKER_PORT_RANGE"]
