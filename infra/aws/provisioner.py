"""The EC2 provisioner: validate, launch, describe and delete what gpuflow creates.

This is the AWS half of ``gpuflow up/status/down/reap``; the use cases in
:mod:`gpuflow.clusters` drive it and own the bookkeeping (state cache, local
key files, rollback order).  Every call goes through :class:`AwsApi` (retries,
one-line errors).

Everything gpuflow creates carries the tags below: AWS tags are the source of
truth, so ``down`` and ``reap`` can find what a crashed or forgotten ``up``
left, without any local state.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuflow.errors import CapacityError, CloudError, CredentialsError, UsageError
from gpuflow.records import Node
from infra.aws.client import AwsApi, AwsCallError, AwsCapacityError, known_regions
from infra.dlami import no_dlami_message, resolve_dlami

TAG_CLUSTER = "gpuflow:cluster"
TAG_OWNER = "gpuflow:owner"  # user@host, for people reading the console
TAG_OWNER_ID = "gpuflow:owner-id"  # the creating gpuflow home's id: what `reap` goes by
TAG_CREATED_AT = "gpuflow:created-at"
TAG_MANAGED = "gpuflow:managed"
TAG_LAUNCH = "gpuflow:launch-id"  # one per `up` invocation: what rollback may delete
TAG_EXPIRES_AT = "gpuflow:expires-at"  # created-at + --max-hours: `reap --expired` takes only what is past it

# Spot launches through the API need this service-linked role in the account
# (AWS creates it by itself only for spot requests made in the console).
SPOT_SERVICE_LINKED_ROLE = "AWSServiceRoleForEC2Spot"
CREATE_SPOT_ROLE_COMMAND = "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com"

LIVE_STATES = ("pending", "running", "stopping", "stopped")
GONE_STATES = ("shutting-down", "terminated")


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def tag_dict(tags: Iterable[dict[str, str]] | None) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in tags or ()}


def client_token(cluster_name: str, launch_id: str, attempt: int) -> str:
    """RunInstances idempotency token: the same cluster, `up` and attempt give
    the same token, so a retried call (lost response, botocore retry) cannot
    launch twice; another zone or market is another attempt (another token,
    because EC2 rejects one token with different parameters)."""
    digest = hashlib.sha256(f"{cluster_name}\0{launch_id}\0{attempt}".encode()).hexdigest()
    return f"gpuflow-{digest[:40]}"


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")
    return str(value)


@dataclass(frozen=True)
class InstanceTypeInfo:
    name: str
    gpu_count: int
    gpu_name: str | None
    gpu_memory_mib: int
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    name: str
    root_device_name: str
    source: str  # "ssm" | "name-search" | "explicit"
    root_volume_gb: int | None = None  # size of the root snapshot: the smallest root volume EC2 accepts
    parameter: str | None = None  # the public SSM parameter the id came from

    @classmethod
    def from_api(cls, image: dict[str, Any], source: str) -> ImageInfo:
        root_device = image.get("RootDeviceName") or "/dev/sda1"
        sizes = [
            mapping.get("Ebs", {}).get("VolumeSize")
            for mapping in image.get("BlockDeviceMappings", [])
            if mapping.get("DeviceName") == root_device
        ]
        size = next((int(value) for value in sizes if value), None)
        return cls(image["ImageId"], image.get("Name", ""), root_device, source, size)


@dataclass(frozen=True)
class InstanceView:
    """One instance as EC2 describes it, with its tags."""

    instance_id: str
    state: str
    instance_type: str
    public_ip: str | None
    private_ip: str | None
    availability_zone: str | None
    launch_time: str | None
    lifecycle: str
    tags: dict[str, str] = field(default_factory=dict)
    spot_request_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    key_name: str | None = None
    state_reason: str | None = None

    @property
    def cluster(self) -> str | None:
        return self.tags.get(TAG_CLUSTER)

    def to_node(self) -> Node:
        return Node(
            instance_id=self.instance_id,
            state=self.state,
            public_ip=self.public_ip,
            private_ip=self.private_ip,
            availability_zone=self.availability_zone,
            launch_time=self.launch_time,
            lifecycle=self.lifecycle,
        )

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> InstanceView:
        return cls(
            instance_id=data["InstanceId"],
            state=data.get("State", {}).get("Name", "unknown"),
            instance_type=data.get("InstanceType", ""),
            public_ip=data.get("PublicIpAddress"),
            private_ip=data.get("PrivateIpAddress"),
            availability_zone=data.get("Placement", {}).get("AvailabilityZone"),
            launch_time=_iso(data.get("LaunchTime")),
            lifecycle="spot" if data.get("InstanceLifecycle") == "spot" else "on-demand",
            tags=tag_dict(data.get("Tags")),
            spot_request_id=data.get("SpotInstanceRequestId"),
            security_group_ids=tuple(group["GroupId"] for group in data.get("SecurityGroups", ())),
            key_name=data.get("KeyName"),
            state_reason=(data.get("StateReason") or {}).get("Message"),
        )


@dataclass(frozen=True)
class LaunchRequest:
    cluster_name: str
    launch_id: str
    instance_type: str
    image: ImageInfo
    count: int
    key_name: str
    security_group_id: str
    subnets: tuple[tuple[str, str], ...]  # (subnet id, availability zone), in the order to try
    disk_gb: int
    user_data: str
    tags: dict[str, str]
    spot: bool = False
    spot_fallback: bool = False


@dataclass(frozen=True)
class LaunchResult:
    instance_ids: tuple[str, ...]
    availability_zone: str
    market: str  # "spot" | "on-demand"
    failed_attempts: tuple[str, ...] = ()  # "us-east-1a/spot: InsufficientInstanceCapacity", ...


@dataclass(frozen=True)
class ManagedResource:
    """Something tagged ``gpuflow:managed`` (for reap)."""

    kind: str  # instance | volume | security-group | key-pair | spot-request
    resource_id: str
    cluster: str | None
    created_at: str | None = None
    state: str | None = None
    detail: str | None = None
    owner: str | None = None  # the gpuflow:owner tag (user@host that created it)
    owner_id: str | None = None  # the gpuflow:owner-id tag
    expires_at: str | None = None  # the gpuflow:expires-at tag
    launch_id: str | None = None  # the gpuflow:launch-id tag


def _managed_resource(
    kind: str, resource_id: str, tags: dict[str, str], state: str | None = None, detail: str | None = None
) -> ManagedResource:
    return ManagedResource(
        kind, resource_id, tags.get(TAG_CLUSTER), tags.get(TAG_CREATED_AT), state, detail,
        tags.get(TAG_OWNER), tags.get(TAG_OWNER_ID), tags.get(TAG_EXPIRES_AT), tags.get(TAG_LAUNCH),
    )


ProgressCallback = Callable[[str], None]


class Ec2Provisioner:
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

    # ----------------------------------------------------------- validation
    @staticmethod
    def validate_region(region: str) -> None:
        """Refuse a region botocore does not know (no network call)."""
        if region not in known_regions():
            raise UsageError(
                f"unknown AWS region {region!r}",
                hint="use a region name such as us-east-1 or eu-west-1 (`aws ec2 describe-regions`)",
            )

    def instance_type_info(self, instance_type: str) -> InstanceTypeInfo:
        try:
            response = self.api.call("ec2", "describe_instance_types", InstanceTypes=[instance_type])
        except AwsCallError as exc:
            if exc.code in ("InvalidInstanceType", "InvalidParameterValue"):
                raise UsageError(
                    f"instance type {instance_type!r} does not exist in {self.region}",
                    hint="pick one such as g5.xlarge, g4dn.xlarge or g6.xlarge",
                ) from exc
            raise
        types = response.get("InstanceTypes", [])
        if not types:
            raise UsageError(f"instance type {instance_type!r} does not exist in {self.region}")
        data = types[0]
        gpus = (data.get("GpuInfo") or {}).get("Gpus", [])
        return InstanceTypeInfo(
            name=instance_type,
            gpu_count=sum(int(gpu.get("Count", 0)) for gpu in gpus),
            gpu_name=gpus[0].get("Name") if gpus else None,
            gpu_memory_mib=int((data.get("GpuInfo") or {}).get("TotalGpuMemoryInMiB", 0)),
            vcpus=int(data.get("VCpuInfo", {}).get("DefaultVCpus", 0)),
            memory_mib=int(data.get("MemoryInfo", {}).get("SizeInMiB", 0)),
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

    def offered_zones(self, instance_type: str) -> list[str]:
        """Availability zones of the region that offer ``instance_type``."""
        offerings = self.api.paginate(
            "ec2",
            "describe_instance_type_offerings",
            "InstanceTypeOfferings",
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [instance_type]}],
        )
        return sorted({offering["Location"] for offering in offerings})

    # ---------------------------------------------------------------- image
    def resolve_image(self, explicit_ami: str | None = None, tensorflow_dlami: str | None = None) -> ImageInfo:
        """``--ami`` when given; else the Deep Learning AMI :func:`infra.dlami.resolve_dlami`
        chooses (the newest TensorFlow DLAMI, or the pinned ``tensorflow_dlami`` version)."""
        if explicit_ami:
            return self._describe_image(explicit_ami, source="explicit")
        choice = resolve_dlami(self.api.call, tensorflow_version=tensorflow_dlami)
        if choice is None:
            message, hint = no_dlami_message(self.region, tensorflow_dlami)
            raise UsageError(message, hint=hint)
        image = self._describe_image(choice.image_id, source=choice.source)
        return dataclasses.replace(image, parameter=choice.parameter)

    def _describe_image(self, image_id: str, *, source: str) -> ImageInfo:
        try:
            images = self.api.call("ec2", "describe_images", ImageIds=[image_id]).get("Images", [])
        except AwsCallError as exc:
            if (exc.code or "").startswith("InvalidAMIID"):
                raise UsageError(f"AMI {image_id!r} does not exist in {self.region}", hint="check --ami") from exc
            raise
        if not images:
            raise UsageError(f"AMI {image_id!r} does not exist in {self.region}", hint="check --ami")
        return ImageInfo.from_api(images[0], source)

    # ------------------------------------------------------- key pair / SG
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

    # -------------------------------------------------------------- launch
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

    def launch(self, request: LaunchRequest, *, on_attempt: ProgressCallback | None = None) -> LaunchResult:
        """RunInstances with fallbacks: each zone for spot, then (with
        ``spot_fallback``) each zone on-demand.  A capacity error moves on at
        once; any other error ends the launch."""
        if request.spot:
            markets = ("spot", "on-demand") if request.spot_fallback else ("spot",)
        else:
            markets = ("on-demand",)
        failures: list[str] = []
        attempt = 0
        for market in markets:
            for subnet_id, zone in request.subnets:
                if on_attempt:
                    on_attempt(f"launching {request.count} x {request.instance_type} ({market}) in {zone}")
                try:
                    response = self.api.call("ec2", "run_instances", **self._run_params(request, subnet_id, market, attempt))
                except AwsCapacityError as exc:
                    failures.append(f"{zone}/{market}: {exc.code}")
                    attempt += 1
                    continue
                ids = tuple(instance["InstanceId"] for instance in response.get("Instances", []))
                return LaunchResult(ids, zone, market, tuple(failures))
        raise CapacityError(
            f"no capacity for {request.count} x {request.instance_type} in {self.region} ({'; '.join(failures)})",
            hint="try later, another --region or --instance-type"
            + ("" if not request.spot or request.spot_fallback else ", or --spot-fallback"),
        )

    def _run_params(self, request: LaunchRequest, subnet_id: str, market: str, attempt: int) -> dict[str, Any]:
        resource_tags = tag_list(request.tags)
        tag_specifications = [
            {"ResourceType": "instance", "Tags": resource_tags + [{"Key": "Name", "Value": f"gpuflow-{request.cluster_name}"}]},
            {"ResourceType": "volume", "Tags": resource_tags},
        ]
        params: dict[str, Any] = {
            "ImageId": request.image.image_id,
            "InstanceType": request.instance_type,
            "MinCount": request.count,
            "MaxCount": request.count,
            "KeyName": request.key_name,
            "SubnetId": subnet_id,
            "SecurityGroupIds": [request.security_group_id],
            "UserData": request.user_data,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [
                {
                    "DeviceName": request.image.root_device_name,
                    "Ebs": {
                        "VolumeSize": request.disk_gb,
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "TagSpecifications": tag_specifications,
            "ClientToken": client_token(request.cluster_name, request.launch_id, attempt),
        }
        if market == "spot":
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
            tag_specifications.append({"ResourceType": "spot-instances-request", "Tags": resource_tags})
        return params

    # ------------------------------------------------------------ describe
    def describe_instances(self, instance_ids: Sequence[str]) -> list[InstanceView]:
        """The given instances (ones EC2 no longer knows are simply absent)."""
        if not instance_ids:
            return []
        try:
            reservations = self.api.paginate("ec2", "describe_instances", "Reservations", InstanceIds=list(instance_ids))
        except AwsCallError as exc:
            if exc.code != "InvalidInstanceID.NotFound" or len(instance_ids) == 1:
                if exc.code == "InvalidInstanceID.NotFound":
                    return []
                raise
            # One unknown id fails the whole call: ask one by one.
            return [view for instance_id in instance_ids for view in self.describe_instances([instance_id])]
        return [InstanceView.from_api(instance) for reservation in reservations for instance in reservation["Instances"]]

    def find_instances(
        self, *, cluster: str | None = None, launch_id: str | None = None, states: Sequence[str] = LIVE_STATES
    ) -> list[InstanceView]:
        """Instances tagged by gpuflow (optionally of one cluster / one `up`)."""
        filters = [{"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]}]
        if cluster is not None:
            filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
        if launch_id is not None:
            filters.append({"Name": f"tag:{TAG_LAUNCH}", "Values": [launch_id]})
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        reservations = self.api.paginate("ec2", "describe_instances", "Reservations", Filters=filters)
        return [InstanceView.from_api(instance) for reservation in reservations for instance in reservation["Instances"]]

    def instance_status_ok(self, instance_ids: Sequence[str]) -> dict[str, bool]:
        statuses = self.api.paginate(
            "ec2", "describe_instance_status", "InstanceStatuses", InstanceIds=list(instance_ids), IncludeAllInstances=True
        )
        result = {instance_id: False for instance_id in instance_ids}
        for status in statuses:
            result[status["InstanceId"]] = (
                status.get("InstanceStatus", {}).get("Status") == "ok"
                and status.get("SystemStatus", {}).get("Status") == "ok"
            )
        return result

    def wait_until(
        self,
        instance_ids: Sequence[str],
        target: str,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> list[InstanceView]:
        """Poll until every instance is ``running``, status ``ok`` (running and
        both status checks passed) or ``terminated``; return the last views.

        Raises CloudError when an instance dies while starting, or on timeout.
        """
        deadline = self._clock() + self.timeout_seconds
        while True:
            views = self.describe_instances(instance_ids)
            if target == "terminated":
                remaining = [view for view in views if view.state != "terminated"]
                done = not remaining
                summary = f"{len(instance_ids) - len(remaining)}/{len(instance_ids)} terminated"
            else:
                dead = [view for view in views if view.state in GONE_STATES or view.state in ("stopping", "stopped")]
                if dead:
                    reason = dead[0].state_reason or dead[0].state
                    raise CloudError(f"instance {dead[0].instance_id} went to {dead[0].state} while starting: {reason}")
                running = [view for view in views if view.state == "running"]
                done = len(running) == len(instance_ids)
                summary = f"{len(running)}/{len(instance_ids)} running"
                if done and target == "ok":
                    statuses = self.instance_status_ok(instance_ids)
                    passed = sum(statuses.values())
                    done = passed == len(instance_ids)
                    summary = f"{len(running)}/{len(instance_ids)} running, {passed}/{len(instance_ids)} status checks ok"
            if on_progress:
                on_progress(summary)
            if done:
                return views
            if self._clock() >= deadline:
                raise CloudError(
                    f"timed out after {self.timeout_seconds:.0f} s waiting for {target} ({summary})",
                )
            self.api.sleep(self.poll_seconds)

    def terminate(self, instance_ids: Sequence[str]) -> None:
        if not instance_ids:
            return
        try:
            self.api.call("ec2", "terminate_instances", InstanceIds=list(instance_ids))
        except AwsCallError as exc:
            if exc.code != "InvalidInstanceID.NotFound":
                raise
            for instance_id in instance_ids:  # some are already gone: terminate the rest one by one
                try:
                    self.api.call("ec2", "terminate_instances", InstanceIds=[instance_id])
                except AwsCallError as single:
                    if single.code != "InvalidInstanceID.NotFound":
                        raise

    def instance_state(self, instance_id: str) -> str:
        """'running', 'terminated', ... or 'not-found'."""
        views = self.describe_instances([instance_id])
        return views[0].state if views else "not-found"

    def console_output(self, instance_id: str) -> str:
        """The instance's serial console text (decoded), '' when none yet."""
        try:
            output = self.api.call("ec2", "get_console_output", InstanceId=instance_id).get("Output") or ""
        except AwsCallError as exc:
            if exc.code == "InvalidInstanceID.NotFound":
                return ""
            raise
        try:
            return base64.b64decode(output, validate=True).decode("utf-8", errors="replace")
        except (ValueError, TypeError):
            return output  # some endpoints (moto) return it already decoded

    # ---------------------------------------------------------------- cost
    def spot_price(self, instance_type: str, availability_zone: str | None) -> float | None:
        """The current spot price ($/h) of the type (in the zone when given)."""
        params: dict[str, Any] = {
            "InstanceTypes": [instance_type],
            "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            "StartTime": datetime.datetime.now(datetime.timezone.utc),
            "MaxResults": 20,
        }
        if availability_zone:
            params["AvailabilityZone"] = availability_zone
        history = self.api.call("ec2", "describe_spot_price_history", **params).get("SpotPriceHistory", [])
        in_zone = [entry for entry in history if not availability_zone or entry.get("AvailabilityZone") == availability_zone]
        entries = in_zone or history
        if not entries:
            return None
        latest = max(entries, key=lambda entry: entry.get("Timestamp") or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc))
        return float(latest["SpotPrice"])

    # --------------------------------------------------------------- reap
    def managed_resources(self) -> list[ManagedResource]:
        """Everything in the region tagged ``gpuflow:managed=true`` that still costs or clutters."""
        managed = [{"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]}]
        resource = _managed_resource
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
        return resources

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
            _managed_resource("security-group", group["GroupId"], tag_dict(group.get("Tags")), None, group.get("GroupName"))
            for group in groups
        ] + [_managed_resource("key-pair", key["KeyName"], tag_dict(key.get("Tags"))) for key in keys]

    def cancel_spot_requests(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            try:
                self.api.call("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=list(request_ids))
            except AwsCallError as exc:
                if exc.code != "InvalidSpotInstanceRequestID.NotFound":
                    raise

    def delete_volume(self, volume_id: str) -> None:
        try:
            self.api.call("ec2", "delete_volume", VolumeId=volume_id)
        except AwsCallError as exc:
            if exc.code != "InvalidVolume.NotFound":
                raise


__all__ = [
    "Ec2Provisioner",
    "ImageInfo",
    "InstanceTypeInfo",
    "InstanceView",
    "LaunchRequest",
    "LaunchResult",
    "ManagedResource",
    "TAG_CLUSTER",
    "TAG_CREATED_AT",
    "TAG_EXPIRES_AT",
    "TAG_LAUNCH",
    "TAG_MANAGED",
    "TAG_OWNER",
    "TAG_OWNER_ID",
    "client_token",
]


class SandboxProvisioner(Ec2Provisioner):
    """The sandbox cloud's provisioner (:func:`infra.aws.open_provisioner` picks it
    once, for ``sandbox=True``): moto's EC2, plus what moto cannot do — a
    terminated sandbox instance's jobs die and its directory goes
    (:func:`gpuflow.remote.discard_sandbox_instance`), whichever use case
    terminates it (``down``, ``reap``, ``run --down``, an ``up`` rolled back)."""

    def terminate(self, instance_ids: Sequence[str]) -> None:
        from gpuflow.remote import discard_sandbox_instance

        tagged = {view.instance_id: view.cluster for view in self.describe_instances(instance_ids)}
        # Jobs and directory first: gpuflow killed in between then leaves a running instance
        # with nothing on it (the next `down` terminates it), never jobs on a terminated one.
        for instance_id in instance_ids:
            for cluster in _sandbox_clusters_of(instance_id, tagged.get(instance_id)):
                discard_sandbox_instance(cluster, instance_id)
        super().terminate(instance_ids)


def _sandbox_clusters_of(instance_id: str, tagged: str | None) -> list[str]:
    """The cluster whose sandbox directory holds the instance: its tag; for an
    instance the fake cloud no longer knows (its server was restarted), the
    cluster directories holding a directory named by that instance id."""
    from gpuflow.config import gpuflow_home
    from gpuflow.state import validate_name

    try:
        validate_name(instance_id, "instance id")
        if tagged is not None:
            return [validate_name(tagged, "cluster name")]
    except UsageError:  # a tag gpuflow did not write: no directory of ours can match it
        return []
    root = gpuflow_home() / "sandbox"
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir() if not path.name.startswith(".") and (path / instance_id).is_dir())
