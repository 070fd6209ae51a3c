"""Which machine image and instance type: the Deep Learning AMI (or ``--ami``), the type's GPUs and zones.

One part of :class:`infra.aws.provisioner.Ec2Provisioner` (:class:`Images`);
the AMI names it looks up are :mod:`infra.dlami`'s.
"""

from __future__ import annotations

from infra.aws.client import AwsApi, AwsCallError
from infra.dlami import (
    DLAMI_BASE_SSM_PARAMETER,
    DLAMI_NAME_PATTERN,
    DLAMI_OWNER_ID,
    DLAMI_SSM_PARAMETER,
)
from infra.errors import UsageError
from infra.records import ImageInfo, InstanceTypeInfo


class Images:
    """The image to launch and what an instance type offers, in one region."""

    api: AwsApi
    region: str

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

    def resolve_image(self, explicit_ami: str | None = None) -> ImageInfo:
        """``--ami`` when given; else the TensorFlow Deep Learning AMI from its
        public SSM parameter; else the newest image matching its name; else the
        base Deep Learning AMI's parameter."""
        if explicit_ami:
            return self._describe_image(explicit_ami, source="explicit")
        image_id = self._ssm_image_id(DLAMI_SSM_PARAMETER)
        if image_id:
            return self._describe_image(image_id, source="ssm")
        images = self.api.call(
            "ec2",
            "describe_images",
            Owners=[DLAMI_OWNER_ID],
            Filters=[{"Name": "name", "Values": [DLAMI_NAME_PATTERN]}, {"Name": "state", "Values": ["available"]}],
        ).get("Images", [])
        if images:
            newest = max(images, key=lambda image: image.get("CreationDate", ""))
            return ImageInfo.from_api(newest, "name-search")
        image_id = self._ssm_image_id(DLAMI_BASE_SSM_PARAMETER)
        if image_id:
            return self._describe_image(image_id, source="ssm")
        raise UsageError(
            f"no AWS Deep Learning AMI found in {self.region}",
            hint="pass --ami with an Ubuntu image id that has NVIDIA drivers",
        )

    def _ssm_image_id(self, parameter: str) -> str | None:
        try:
            return self.api.call("ssm", "get_parameter", Name=parameter)["Parameter"]["Value"]
        except AwsCallError as exc:
            if exc.code in ("ParameterNotFound", "ParameterVersionNotFound"):
                return None
            raise

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


__all__ = ["Images"]
