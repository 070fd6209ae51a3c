"""The sandbox cloud: the EC2 API is moto, "the instance" is this machine.

``gpuflow --sandbox`` runs the real ``infra/`` provisioning code against moto,
so a user (or their CI) can exercise the whole workflow with no AWS account.
Two shapes:

* :func:`in_process_sandbox` — ``moto.mock_aws()`` plus seeding, for one
  process that does everything (``gpuflow demo``, ``run --up ... --down``).
* :func:`sandbox_endpoint` — a detached moto server on 127.0.0.1 that keeps
  the fake EC2 state across separate CLI invocations (``up`` now, ``down``
  later); boto3 clients point ``endpoint_url`` at it.

moto lacks the Deep Learning AMI and its public SSM parameter, so both shapes
seed them with :func:`seed_deep_learning_ami`, using exactly the names the
provisioner resolves (:mod:`infra.dlami`).

moto is imported inside functions only: the CLI imports this module lazily,
and ``gpuflow --help`` must not pay for moto (~0.4 s).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


from infra.dlami import (
    DLAMI_OWNER_ALIAS,
    DLAMI_OWNER_ID,
    DLAMI_SANDBOX_IMAGE_NAME,
    DLAMI_SSM_PARAMETERS,
)

DEFAULT_SANDBOX_REGION = "us-east-1"


def _default_account_id() -> str:
    from moto.core import DEFAULT_ACCOUNT_ID

    return DEFAULT_ACCOUNT_ID


def seed_deep_learning_ami(region: str, *, account_id: str | None = None) -> str:
    """Register the Deep Learning AMI image and its public SSM parameters in
    the *active* moto backend (a ``mock_aws()`` context, or the moto server
    running in this process) for ``region``; return the AMI id.

    Idempotent: a second call in the same backend returns the same id.  The
    backends are written directly because moto refuses ``put_parameter``
    under ``/aws/`` and ``register_image`` cannot set Amazon as the owner.
    """
    import datetime

    from moto.backends import get_backend
    from moto.ec2.models.amis import Ami
    from moto.ec2.utils import random_ami_id
    from moto.ssm.models import Parameter

    account_id = account_id or _default_account_id()
    ec2_backend = get_backend("ec2")[account_id][region]
    image = next(
        (candidate for candidate in ec2_backend.amis.values() if candidate.name == DLAMI_SANDBOX_IMAGE_NAME),
        None,
    )
    if image is None:
        image = Ami(
            ec2_backend,
            random_ami_id(),
            name=DLAMI_SANDBOX_IMAGE_NAME,
            description="gpuflow sandbox stand-in for the AWS Deep Learning AMI with TensorFlow",
            owner_id=DLAMI_OWNER_ID,
            owner_alias=DLAMI_OWNER_ALIAS,
            public=True,
            virtualization_type="hvm",
            architecture="x86_64",
            root_device_type="ebs",
            root_device_name="/dev/sda1",
            creation_date=datetime.datetime(2024, 7, 1, tzinfo=datetime.timezone.utc),
            region_name=region,
        )
        ec2_backend.amis[image.id] = image

    ssm_backend = get_backend("ssm")[account_id][region]
    for parameter_name in DLAMI_SSM_PARAMETERS:
        versions = ssm_backend._parameters[parameter_name]
        if versions and versions[-1].value == image.id:
            continue
        versions.append(
            Parameter(
                account_id=account_id,
                name=parameter_name,
                value=image.id,
                parameter_type="String",
                description=None,
                allowed_pattern=None,
                keyid=None,
                last_modified_date=datetime.datetime.now(datetime.timezone.utc),
                version=len(versions) + 1,
                data_type="aws:ec2:image",
            )
        )
    return image.id


@contextlib.contextmanager
def in_process_sandbox(regions: tuple[str, ...] = (DEFAULT_SANDBOX_REGION,)) -> Iterator[dict[str, str]]:
    """``moto.mock_aws()`` seeded with the Deep Learning AMI in ``regions``.

    Yields ``{region: ami_id}``.  Everything boto3 does inside the block hits
    moto in this process; nothing leaves the machine.
    """
    from moto import mock_aws

    with mock_aws():
        yield {region: seed_deep_learning_ami(region) for region in regions}


