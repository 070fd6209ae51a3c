"""Seeding moto with what it lacks (the Deep Learning AMI and its SSM parameters, a spot price history), and the in-process sandbox.

moto lacks the Deep Learning AMI and its public SSM parameter, so both shapes
of the sandbox seed them with :func:`seed_deep_learning_ami`, using exactly the
names the provisioner resolves (:mod:`infra.dlami`).  moto answers every
``DescribeSpotPriceHistory`` with $0.00001; both shapes answer it from a
seeded, fake history instead (:func:`seeded_spot_price_history`).  moto is
imported inside functions only.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
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
def in_process_sandbox(
    regions: tuple[str, ...] = (DEFAULT_SANDBOX_REGION,),
    *,
    sandbox_root: Path | None = None,
    discard_instance: Callable[[str, str | None], None] | None = None,
) -> Iterator[dict[str, str]]:
    """``moto.mock_aws()`` with the Deep Learning AMI seeded.

    ``regions`` are seeded up front (yields ``{region: ami_id}``); any other
    region is seeded on the first boto3 request that names it, so the
    provisioner's own region choice works unchanged.  Everything boto3 does
    inside the block hits moto in this process; nothing leaves the machine.
    With ``sandbox_root`` (where the instances' directories are) and
    ``discard_instance``, this process also hosts each instance's IMDS and
    carries out simulated interruptions (:class:`infra.sandbox.imds.SandboxKeeper`).
    """
    if sandbox_root is not None and discard_instance is not None:
        from infra.sandbox.imds import SandboxKeeper

        with _in_process_sandbox(regions) as amis:
            keeper = SandboxKeeper(sandbox_root, discard_instance).start()
            try:
                yield amis
            finally:
                keeper.stop()
        return
    with _in_process_sandbox(regions) as amis:
        yield amis


@contextlib.contextmanager
def _in_process_sandbox(regions: tuple[str, ...]) -> Iterator[dict[str, str]]:
    from unittest import mock

    with mock.patch.dict(os.environ, accountless_environment(os.environ), clear=True):
        from moto.core import models as moto_models

        from infra.aws.client import in_process_mock
        from infra.sandbox.fleet import faithful_instant_fleets

        seeder = RegionSeeder(seed_deep_learning_ami)
        stubber = getattr(moto_models, "botocore_stubber", None)
        with in_process_mock(), seeded_spot_price_history(), faithful_instant_fleets():
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


# --------------------------------------------------------------------------- the spot price history

# FAKE figures, for the sandbox only: a spot price is the on-demand list price of
# infra/prices.json times a fraction that depends on the zone's letter (a: 0.30,
# b: 0.33, c: 0.36, d: 0.39, e: 0.42, f: 0.30, ...) -- real spot prices of these
# types are mostly 30-45% of on-demand.  Each (zone, type) has three entries: the
# price now (since the start of the current hour), 4% lower a day earlier, 9%
# higher two days earlier.  Types outside the price table have no history, so
# gpuflow shows no spot price for them, as for a type AWS has no history of.
_SPOT_FRACTION_BASE = 0.30
_SPOT_FRACTION_STEP = 0.03
_SPOT_FRACTION_STEPS = 5
_SPOT_HISTORY = ((datetime.timedelta(0), 1.0), (datetime.timedelta(days=1), 0.96), (datetime.timedelta(days=2), 1.09))


@functools.lru_cache(maxsize=1)
def _on_demand_prices() -> dict[str, float]:
    from infra.aws.pricing import load_price_table

    return load_price_table().on_demand


def sandbox_spot_price(region: str, availability_zone: str, instance_type: str) -> float | None:
    """The sandbox's current (fake) spot price of ``instance_type`` in ``availability_zone``, $/h;
    None for a type outside the on-demand price table.  The same in every region."""
    on_demand = _on_demand_prices().get(instance_type)
    if on_demand is None:
        return None
    letter = availability_zone[len(region):] if availability_zone.startswith(region) else availability_zone[-1:]
    steps = (ord(letter[:1] or "a") - ord("a")) % _SPOT_FRACTION_STEPS
    return round(on_demand * (_SPOT_FRACTION_BASE + _SPOT_FRACTION_STEP * steps), 4)


def sandbox_spot_history(
    region: str, availability_zone: str, instance_type: str, now: datetime.datetime
) -> list[tuple[datetime.datetime, float]]:
    """The seeded history of one (zone, type), newest first: (since when, $/h)."""
    current = sandbox_spot_price(region, availability_zone, instance_type)
    if current is None:
        return []
    hour = now.astimezone(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0)
    return [(hour - back, round(current * factor, 4)) for back, factor in _SPOT_HISTORY]


def _parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        try:
            moment = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def _describe_spot_price_history(self: Any) -> Any:
    """moto's EC2 ``DescribeSpotPriceHistory`` answered from the seeded history: the
    offerings moto knows in the region (filtered by type, zone and filters as moto
    does), the ``AvailabilityZone`` parameter honoured, and, with ``StartTime``, the
    entries from then on plus the one in effect at that moment (as EC2 answers)."""
    from moto.core.responses import ActionResult

    instance_types = self._get_param("InstanceTypes", [])
    zone = self._get_param("AvailabilityZone")
    start = _parse_time(self._get_param("StartTime"))
    offerings = self.ec2_backend.describe_spot_price_history(instance_types, self._filters_from_querystring())
    region = self.ec2_backend.region_name
    now = datetime.datetime.now(datetime.timezone.utc)
    history = []
    for offering in offerings:
        if zone and offering["Location"] != zone:
            continue
        entries = sandbox_spot_history(region, offering["Location"], offering["InstanceType"], now)
        if start is not None:
            in_effect = [entry for entry in entries if entry[0] <= start][:1]
            entries = [entry for entry in entries if entry[0] > start] + in_effect
        history += [
            {
                "InstanceType": offering["InstanceType"],
                "ProductDescription": "Linux/UNIX",
                "SpotPrice": f"{price:.6f}",
                "AvailabilityZone": offering["Location"],
                "Timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            }
            for moment, price in entries
        ]
    return ActionResult({"SpotPriceHistory": history})


@contextlib.contextmanager
def seeded_spot_price_history() -> Iterator[None]:
    """While active, moto (in this process: the in-process mock or the sandbox server)
    answers ``DescribeSpotPriceHistory`` from the seeded history."""
    from unittest import mock

    from moto.ec2.responses.spot_instances import SpotInstances

    with mock.patch.object(SpotInstances, "describe_spot_price_history", _describe_spot_price_history):
        yield
