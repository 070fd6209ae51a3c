"""Which machine image and instance type: the Deep Learning AMI (or ``--ami``), the type's GPUs and zones.

One part of :class:`infra.aws.provisioner.Ec2Provisioner` (:class:`Images`);
the AMI names it looks up are :mod:`infra.dlami`'s.
"""

from __future__ import annotations

import dataclasses

from infra.aws.client import AwsApi, AwsCallError
from infra.dlami import no_dlami_message, resolve_dlami
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


__all__ = ["Images"]
