"""boto3 clients for one region, every call through one retrying, error-mapping path.

Why a wrapper instead of bare clients:

* **Throttling.**  botocore's ``standard`` retry mode retries throttling and
  5xx answers a few times within a second or two.  EC2's request-rate limits
  (``RequestLimitExceeded``) need longer, jittered back-off than that, so every
  call also goes through :meth:`AwsApi.call`, which retries those codes with
  capped exponential back-off and full jitter.  The sleep function is
  injectable so tests do not sleep.
* **Capacity errors fail fast.**  ``InsufficientInstanceCapacity`` and friends
  are never retried here: the provisioner falls back to another zone or market
  at once.
* **One-line errors.**  botocore exceptions become :mod:`infra.errors`
  exceptions (missing credentials -> :class:`CredentialsError`, a refused call
  -> :class:`CloudError`), keeping the AWS error code in ``.code`` for callers
  that branch on it.
* **Endpoint injection.**  The sandbox points clients at a loopback moto
  server (``endpoint_url``) with fixed fake credentials, so no real credential
  is ever sent anywhere but AWS.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session

from infra.errors import CapacityError, CloudError, CredentialsError, GpuflowError

# Codes worth waiting for: the request was fine, AWS was busy.
RETRYABLE_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

# No capacity for this type/market/zone right now: try elsewhere, do not wait.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientCapacityOnHost",
        "InsufficientReservedInstanceCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "Unsupported",  # type not supported in this zone
    }
)

# The caller's credentials are missing, wrong, expired or lack a permission.
CREDENTIAL_CODES = frozenset(
    {
        "AuthFailure",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "UnauthorizedOperation",
        "AccessDenied",
        "AccessDeniedException",
        "OptInRequired",
    }
)

SANDBOX_ACCESS_KEY = "gpuflow-sandbox"  # fake credentials sent only to the loopback sandbox


class AwsCallError(CloudError):
    """A refused AWS call; ``code`` is AWS's error code (e.g. ``InvalidGroup.NotFound``)."""

    def __init__(self, message: str, *, code: str, operation: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.operation = operation


class AwsCapacityError(CapacityError):
    """No capacity for the request (a capacity code); ``code`` as for :class:`AwsCallError`."""

    def __init__(self, message: str, *, code: str, operation: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.operation = operation


class AwsCredentialsError(CredentialsError):
    """Credentials missing or refused; ``code`` is AWS's code or the botocore exception name."""

    def __init__(self, message: str, *, code: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


def error_code(exc: BaseException) -> str | None:
    """AWS's error code of a mapped or raw botocore error, else None."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or None
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off for throttling and server errors: attempt n waits
    ``uniform(0, min(max_delay, base_delay * 2**n))`` (full jitter)."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int, uniform: Callable[[], float] = random.random) -> float:
        return uniform() * min(self.max_delay, self.base_delay * (2**attempt))


@dataclass(frozen=True)
class AwsTarget:
    """Where API calls go: a region, a profile from the standard chain, and an
    optional endpoint (the sandbox's loopback moto server)."""

    region: str
    profile: str | None = None
    endpoint_url: str | None = None
    sandbox: bool = False


# A session that reads no profile and no config file: AWS_PROFILE naming a profile that
# does not exist, or a config file that does not parse, must not break what needs no account
# (the sandbox, botocore's service models and region list).
# Nor does it take an endpoint from AWS_ENDPOINT_URL[_EC2]: the sandbox's endpoint is its own.
_ACCOUNTLESS_SESSION_VARIABLES = {
    "profile": (None, None, None, None),
    "config_file": (None, None, os.devnull, None),
    "credentials_file": (None, None, os.devnull, None),
    "ignore_configured_endpoint_urls": (None, None, True, None),
}


def _accountless_botocore_session() -> Any:
    return botocore.session.Session(session_vars=dict(_ACCOUNTLESS_SESSION_VARIABLES))


@functools.lru_cache(maxsize=1)
def _shared_data_loader() -> Any:
    """botocore's loader of service models, shared by every session this
    process opens: parsing the EC2 model takes ~0.5 s, once is enough."""
    return _accountless_botocore_session().get_component("data_loader")


def _botocore_session(profile: str | None, *, accountless: bool = False) -> Any:
    session = _accountless_botocore_session() if accountless else botocore.session.Session(profile=profile)
    session.register_component("data_loader", _shared_data_loader())
    return session


@functools.lru_cache(maxsize=1)
def known_regions() -> frozenset[str]:
    """Every EC2 region botocore knows, in all partitions (no network call;
    constant for a botocore version, so computed once)."""
    session = _botocore_session(None, accountless=True)
    regions: set[str] = set()
    for partition in session.get_available_partitions():
        regions.update(session.get_available_regions("ec2", partition_name=partition))
    return frozenset(regions)


# How many in_process_mock() blocks are open in this process (any thread): gpuflow's own
# record of "moto answers every AWS call here", instead of reading moto's private state.
_in_process_mocks = 0
_in_process_mocks_lock = threading.Lock()


@contextlib.contextmanager
def in_process_mock() -> Iterator[None]:
    """``moto.mock_aws()`` for the block, recorded as active: while it is,
    sandbox clients need no endpoint (moto answers them before anything is
    sent).  The in-process sandbox enters it; so do tests that drive sandbox
    clusters against a bare moto mock.  Nests (moto's mocks share one state)."""
    global _in_process_mocks
    from moto import mock_aws

    with mock_aws():
        with _in_process_mocks_lock:
            _in_process_mocks += 1
        try:
            yield
        finally:
            with _in_process_mocks_lock:
                _in_process_mocks -= 1


def in_process_mock_active() -> bool:
    """True inside :func:`in_process_mock` (the in-process sandbox, or a test):
    then sandbox clients need no endpoint, moto intercepts them.  A bare
    ``moto.mock_aws()`` entered by someone else does not count: gpuflow goes by
    what it started itself, never by moto's private counters."""
    return _in_process_mocks > 0


@dataclass
class AwsApi:
    """The clients of one :class:`AwsTarget`; every call goes through :meth:`call`."""

    target: AwsTarget
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    uniform: Callable[[], float] = random.random
    _clients: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _session: Any = field(default=None, init=False, repr=False)

    def _boto_session(self) -> Any:
        if self._session is None:
            try:
                if self.target.sandbox:
                    # Never send a real credential to the sandbox (or anywhere but AWS).
                    self._session = boto3.session.Session(
                        aws_access_key_id=SANDBOX_ACCESS_KEY,
                        aws_secret_access_key=SANDBOX_ACCESS_KEY,
                        region_name=self.target.region,
                        botocore_session=_botocore_session(None, accountless=True),
                    )
                else:
                    self._session = boto3.session.Session(
                        region_name=self.target.region, botocore_session=_botocore_session(self.target.profile)
                    )
            except botocore.exceptions.ProfileNotFound as exc:
                raise AwsCredentialsError(
                    f"AWS profile {exc.kwargs.get('profile', self.target.profile)!r} not found",
                    code="ProfileNotFound",
                    hint="check ~/.aws/config or pass another --profile",
                ) from exc
        return self._session

    def client(self, service: str) -> Any:
        """A cached boto3 client for ``service`` in the target's region."""
        if service not in self._clients:
            if self.target.sandbox:
                _require_loopback_endpoint(self.target)
            config = botocore.config.Config(
                region_name=self.target.region,
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=10,
                read_timeout=60,
                user_agent_extra="gpuflow",
                # The sandbox's requests go to 127.0.0.1 directly, never through an HTTP(S)_PROXY from the environment.
                **({"proxies": {}} if self.target.sandbox else {}),
            )
            try:
                self._clients[service] = self._boto_session().client(
                    service, config=config, endpoint_url=self.target.endpoint_url
                )
            except botocore.exceptions.BotoCoreError as exc:  # e.g. an unknown --profile surfaces here
                raise map_botocore_error(exc, f"create {service} client") from exc
        return self._clients[service]

    def call(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        """Call ``operation`` (snake_case method name) with retries for
        throttling/server errors; botocore errors become gpuflow errors."""
        method = getattr(self.client(service), operation)
        attempt = 0
        while True:
            try:
                return method(**params)
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc) or "Unknown"
                if code in RETRYABLE_CODES and attempt + 1 < self.retry.attempts:
                    self.sleep(self.retry.delay(attempt, self.uniform))
                    attempt += 1
                    continue
                raise map_client_error(exc, operation) from exc
            except GpuflowError:
                raise
            except botocore.exceptions.BotoCoreError as exc:
                raise map_botocore_error(exc, operation) from exc

    def paginate(self, service: str, operation: str, result_key: str, **params: Any) -> list[Any]:
        """All items of a paginated ``operation`` (each page through :meth:`call`)."""
        items: list[Any] = []
        token_field = "NextToken"
        while True:
            page = self.call(service, operation, **params)
            items.extend(page.get(result_key, []))
            token = page.get(token_field)
            if not token:
                return items
            params = {**params, token_field: token}


def _require_loopback_endpoint(target: AwsTarget) -> None:
    """A sandbox client talks to a loopback moto server, or to a moto mock in this
    process (which answers before anything is sent) -- never to an AWS endpoint."""
    if target.endpoint_url is None:
        if in_process_mock_active():
            return
        raise CloudError("internal error: a sandbox AWS client without the sandbox's endpoint (refused: it would reach AWS)")
    from urllib.parse import urlsplit

    host = urlsplit(target.endpoint_url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise CloudError(f"internal error: the sandbox endpoint {target.endpoint_url!r} is not a loopback address (refused)")


def map_client_error(exc: botocore.exceptions.ClientError, operation: str) -> GpuflowError:
    """A refused call as a one-line gpuflow error (keeps the AWS code)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    message = str(error.get("Message", "")).strip().replace("\n", " ")
    text = f"AWS refused {operation}: {code}: {message}" if message else f"AWS refused {operation}: {code}"
    if code in CREDENTIAL_CODES:
        hint = (
            "grant the permissions in infra/iam-policy.json"
            if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
            else "check your AWS credentials (aws configure, AWS_PROFILE or --profile)"
        )
        return AwsCredentialsError(text, code=code, hint=hint)
    if code in CAPACITY_CODES:
        return AwsCapacityError(text, code=code, operation=operation)
    return AwsCallError(text, code=code, operation=operation)


def map_botocore_error(exc: botocore.exceptions.BotoCoreError, operation: str) -> GpuflowError:
    """Missing credentials, unknown profile, unreachable endpoint -> one line."""
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return AwsCredentialsError(
            "no usable AWS credentials found",
            code=type(exc).__name__,
            hint="run `aws configure`, set AWS_PROFILE, or pass --profile",
        )
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        profile = exc.kwargs.get("profile", "?")
        return AwsCredentialsError(
            f"AWS profile {profile!r} not found", code="ProfileNotFound", hint="check ~/.aws/config or pass another --profile"
        )
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return AwsCallError("no AWS region configured", code="NoRegion", operation=operation, hint="pass --region")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError)):
        return AwsCallError(
            f"cannot reach the AWS endpoint for {operation}: {exc}",
            code="EndpointConnectionError",
            operation=operation,
            hint="check the network (or that the sandbox server runs)",
        )
    return AwsCallError(f"AWS call {operation} failed: {exc}", code=type(exc).__name__, operation=operation)
