"""Seeding moto with what it lacks (the Deep Learning AMI and its SSM parameters), and the in-process sandbox.

moto lacks the Deep Learning AMI and its public SSM parameter, so both shapes
of the sandbox seed them with :func:`seed_deep_learning_ami`, using exactly the
names the provisioner resolves (:mod:`infra.dlami`).  moto is imported inside
functions only.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from infra.dlami import (
    DLAMI_OWNER_ALIAS,
    DLAMI_OWNER_ID,
    DLAMI_SANDBOX_IMAGE_NAME,
    DLAMI_SSM_PARAMETERS,
)

DEFAULT_SANDBOX_REGION = "us-east-1"
# SigV4 credential scope: Credential=<key id>/<yyyymmdd>/<region>/<service>/aws4_request
_REGION_IN_AUTHORIZATION = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")


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
    """``moto.mock_aws()`` with the Deep Learning AMI seeded.

    ``regions`` are seeded up front (yields ``{region: ami_id}``); any other
    region is seeded on the first boto3 request that names it, so the
    provisioner's own region choice works unchanged.  Everything boto3 does
    inside the block hits moto in this process; nothing leaves the machine.
    """
    from unittest import mock

    with mock.patch.dict(os.environ, accountless_environment(os.environ), clear=True):
        from moto.core import models as moto_models

        from infra.aws.client import in_process_mock

        seeder = RegionSeeder(seed_deep_learning_ami)
        stubber = getattr(moto_models, "botocore_stubber", None)
        with in_process_mock():
            amis = {region: seeder.seed(region) for region in regions}
            if stubber is None or not hasattr(stubber, "process_request"):  # pragma: no cover - other moto versions
                yield amis
                return
            original_process_request = stubber.process_request

            def seeding_process_request(request: Any) -> Any:
                seeder.seed_from_authorization(request.headers.get("Authorization"))
                return original_process_request(request)

            with mock.patch.object(stubber, "process_request", seeding_process_request):
                yield amis


def accountless_environment(environment: dict[str, str] | Any) -> dict[str, str]:
    """``environment`` for moto, which builds botocore sessions from it (at import and
    per backend): no AWS profile and no AWS config or credentials file, so an
    ``AWS_PROFILE`` naming no profile, or a config file that does not parse, cannot
    break the sandbox -- it needs no account -- and no ``AWS_ENDPOINT_URL*`` can
    send a request past the in-process mock."""
    kept = {
        key: value for key, value in environment.items()
        if key not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
        and not key.startswith("AWS_ENDPOINT_URL")  # moto intercepts AWS's own endpoints only
    }
    return {**kept, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


class RegionSeeder:
    """Seeds each region once, the first time it is named (thread-safe: the
    server answers requests on several threads)."""

    def __init__(self, seed: Callable[[str], str]) -> None:
        self._seed = seed
        self._seeded: dict[str, str] = {}
        self._lock = threading.Lock()

    def seed(self, region: str) -> str:
        with self._lock:
            if region not in self._seeded:
                self._seeded[region] = self._seed(region)
            return self._seeded[region]

    def seed_from_authorization(self, authorization: str | bytes | None) -> None:
        """Seed the region of a SigV4-signed request; unsigned or unparsable
        requests, and regions moto does not know, are left to moto."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        match = _REGION_IN_AUTHORIZATION.search(authorization or "")
        if not match:
            return
        try:
            self.seed(match.group(1))
        except Exception as exc:  # noqa: BLE001 - an unknown region: moto answers the request itself
            print(f"gpuflow sandbox: could not seed region {match.group(1)!r}: {exc}", file=sys.stderr, flush=True)
