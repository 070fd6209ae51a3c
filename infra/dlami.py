"""Which AWS Deep Learning AMI gpuflow launches: the names, and the one resolver.

The provisioner (``infra/aws``) resolves the AMI with :func:`resolve_dlami`, and
the sandbox (``infra/sandbox.py``) seeds exactly these names into moto, so the
two cannot drift apart.

AWS publishes each DLAMI's latest id as a public SSM parameter
``/aws/service/deeplearning/ami/<arch>/<ami_type>/latest/ami-id`` where
``ami_type`` is the AMI's name without the words "Deep Learning AMI",
lower-cased and hyphenated (AWS DLAMI developer guide, "Finding the ID of a
DLAMI").  TensorFlow DLAMIs come one per TensorFlow version
(``oss-nvidia-driver-gpu-tensorflow-2.18-ubuntu-22.04``), so the newest is the
highest version among the parameters under the path, not a fixed name.  The
base OSS-driver DLAMI is the fallback when no TensorFlow DLAMI exists in a
region (the job's virtualenv then installs TensorFlow); AWS's naming page spells
it ``base-oss-nvidia-driver-ubuntu-22.04`` while published scripts use
``base-oss-nvidia-driver-gpu-ubuntu-22.04``: both are tried.

This module imports nothing from gpuflow and no AWS SDK: it is given a
``call(service, operation, **params)`` function (the provisioner's API).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Amazon's image-publishing account (owner of every DLAMI).
DLAMI_OWNER_ID = "898082745236"
DLAMI_OWNER_ALIAS = "amazon"

DLAMI_PARAMETER_PATH = "/aws/service/deeplearning/ami/x86_64"
_TENSORFLOW_AMI_TYPE = "oss-nvidia-driver-gpu-tensorflow-{version}-ubuntu-22.04"
_TENSORFLOW_PARAMETER = re.compile(
    re.escape(DLAMI_PARAMETER_PATH) + r"/oss-nvidia-driver-gpu-tensorflow-([0-9]+)\.([0-9]+)-ubuntu-22\.04/latest/ami-id"
)
TENSORFLOW_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")

# The newest TensorFlow DLAMI known when this was written (what the sandbox seeds);
# a real region is asked which versions it has.
NEWEST_KNOWN_TENSORFLOW = "2.18"


def tensorflow_dlami_parameter(version: str) -> str:
    """The SSM parameter of the TensorFlow ``version`` DLAMI (``"2.18"``)."""
    return f"{DLAMI_PARAMETER_PATH}/{_TENSORFLOW_AMI_TYPE.format(version=version)}/latest/ami-id"


DLAMI_SSM_PARAMETER = tensorflow_dlami_parameter(NEWEST_KNOWN_TENSORFLOW)
# The base DLAMI with the same driver: the spelling public scripts use first, then AWS's naming page's.
DLAMI_BASE_SSM_PARAMETERS: tuple[str, ...] = (
    f"{DLAMI_PARAMETER_PATH}/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id",
    f"{DLAMI_PARAMETER_PATH}/base-oss-nvidia-driver-ubuntu-22.04/latest/ami-id",
)
DLAMI_BASE_SSM_PARAMETER = DLAMI_BASE_SSM_PARAMETERS[0]
DLAMI_SSM_PARAMETERS: tuple[str, ...] = (DLAMI_SSM_PARAMETER, *DLAMI_BASE_SSM_PARAMETERS)

# describe_images fallback: Name filter (EC2 wildcard syntax) with Owners=[DLAMI_OWNER_ID];
# the highest TensorFlow version in the name wins, then the newest CreationDate.
DLAMI_NAME_PATTERN = "Deep Learning OSS Nvidia Driver AMI GPU TensorFlow * (Ubuntu 22.04) *"
_NAME_VERSION = re.compile(r"GPU TensorFlow ([0-9]+)\.([0-9]+)(?:\.[0-9]+)* \(Ubuntu 22\.04\)")


def dlami_name_pattern(version: str | None = None) -> str:
    """The describe_images Name filter for any TensorFlow DLAMI, or one ``version``."""
    return DLAMI_NAME_PATTERN if version is None else DLAMI_NAME_PATTERN.replace("TensorFlow *", f"TensorFlow {version}")


# The name the sandbox gives its seeded image (matches DLAMI_NAME_PATTERN).
DLAMI_SANDBOX_IMAGE_NAME = f"Deep Learning OSS Nvidia Driver AMI GPU TensorFlow {NEWEST_KNOWN_TENSORFLOW} (Ubuntu 22.04) 20241115"

# The login user of the Ubuntu-based DLAMIs.
DLAMI_SSH_USER = "ubuntu"

# SSM error codes that mean "no such parameter" (anything else is a real failure).
_NOT_FOUND_CODES = frozenset({"ParameterNotFound", "ParameterVersionNotFound"})
_MAX_PAGES = 200  # GetParametersByPath returns 10 a page: a bound, far above the DLAMIs published

Call = Callable[..., dict[str, Any]]  # call(service, operation, **params) -> the API's response


@dataclass(frozen=True)
class DlamiChoice:
    """The DLAMI chosen, and how: what the cluster record and the run manifest carry."""

    image_id: str
    source: str  # "ssm" (a parameter) | "name-search" (describe_images by name)
    parameter: str | None = None  # the SSM parameter the id came from
    tensorflow_version: str | None = None  # "2.18"; None for the base DLAMI
    name: str | None = None  # the image's name, when the name search found it

    def describe(self) -> str:
        """One phrase for messages: which DLAMI, found how."""
        what = f"TensorFlow {self.tensorflow_version} DLAMI" if self.tensorflow_version else "base DLAMI"
        return f"{what} {self.image_id} ({self.parameter or self.name or self.source})"


def resolve_dlami(call: Call, *, tensorflow_version: str | None = None) -> DlamiChoice | None:
    """The DLAMI to launch, or None when the region has none.

    Without ``tensorflow_version``: the highest-version TensorFlow DLAMI among
    the public parameters under :data:`DLAMI_PARAMETER_PATH`; else the
    TensorFlow DLAMI image with the highest version in its name; else the base
    DLAMI (both parameter spellings).  With ``tensorflow_version`` (pinned in
    ``gpuflow.toml``): that version's parameter, else its image by name, else
    None (a pin never falls back to another version).  API failures other than
    "parameter not found" propagate.
    """
    if tensorflow_version is not None:
        if not TENSORFLOW_VERSION.fullmatch(tensorflow_version):
            raise ValueError(f"not a TensorFlow version: {tensorflow_version!r}")
        parameter = tensorflow_dlami_parameter(tensorflow_version)
        image_id = _parameter_value(call, parameter)
        if image_id:
            return DlamiChoice(image_id, "ssm", parameter, tensorflow_version)
        return _newest_by_name(call, tensorflow_version)
    newest = max(_tensorflow_parameters(call), default=None)
    if newest is not None:
        (major, minor), parameter, image_id = newest
        return DlamiChoice(image_id, "ssm", parameter, f"{major}.{minor}")
    by_name = _newest_by_name(call, None)
    if by_name is not None:
        return by_name
    for parameter in DLAMI_BASE_SSM_PARAMETERS:
        image_id = _parameter_value(call, parameter)
        if image_id:
            return DlamiChoice(image_id, "ssm", parameter, None)
    return None


def no_dlami_message(region: str, tensorflow_version: str | None = None) -> tuple[str, str]:
    """(message, hint) for a region where :func:`resolve_dlami` found nothing."""
    if tensorflow_version is not None:
        return (
            f"no TensorFlow {tensorflow_version} Deep Learning AMI in {region}",
            "remove tensorflow_dlami from gpuflow.toml to take the newest, or pass --ami",
        )
    return f"no AWS Deep Learning AMI found in {region}", "pass --ami with an Ubuntu image id that has NVIDIA drivers"


def _tensorflow_parameters(call: Call) -> Iterator[tuple[tuple[int, int], str, str]]:
    """((major, minor), parameter, image id) of every TensorFlow DLAMI parameter under the path."""
    token: str | None = None
    for _ in range(_MAX_PAGES):
        params: dict[str, Any] = {"Path": DLAMI_PARAMETER_PATH, "Recursive": True}
        if token:
            params["NextToken"] = token
        response = call("ssm", "get_parameters_by_path", **params)
        for parameter in response.get("Parameters", []):
            found = _TENSORFLOW_PARAMETER.fullmatch(parameter.get("Name", ""))
            if found and parameter.get("Value"):
                yield (int(found.group(1)), int(found.group(2))), parameter["Name"], parameter["Value"]
        token = response.get("NextToken")
        if not token:
            return


def _parameter_value(call: Call, parameter: str) -> str | None:
    try:
        return call("ssm", "get_parameter", Name=parameter)["Parameter"]["Value"]
    except Exception as exc:
        if getattr(exc, "code", None) in _NOT_FOUND_CODES:
            return None
        raise


def _newest_by_name(call: Call, version: str | None) -> DlamiChoice | None:
    images = call(
        "ec2",
        "describe_images",
        Owners=[DLAMI_OWNER_ID],
        Filters=[{"Name": "name", "Values": [dlami_name_pattern(version)]}, {"Name": "state", "Values": ["available"]}],
    ).get("Images", [])
    ranked = []
    for image in images:
        found = _NAME_VERSION.search(image.get("Name", ""))
        image_version = (int(found.group(1)), int(found.group(2))) if found else None
        if version is not None and image_version != tuple(int(part) for part in version.split(".")):
            continue
        # A name the pattern matched but whose version this cannot read ranks below every version.
        ranked.append((image_version or (-1, -1), image.get("CreationDate", ""), image))
    if not ranked:
        return None
    image_version, _, image = max(ranked, key=lambda item: (item[0], item[1]))
    found_version = f"{image_version[0]}.{image_version[1]}" if image_version >= (0, 0) else None
    return DlamiChoice(image["ImageId"], "name-search", None, found_version, image.get("Name"))
