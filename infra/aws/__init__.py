"""AWS access for gpuflow: the only place that imports boto3.

:func:`open_provisioner` is the factory the use cases call: it picks the
endpoint (real AWS, the sandbox's loopback moto server, or an in-process moto
mock) so that exactly the same provisioning code runs against all three.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from infra.aws.provisioner import Ec2Provisioner


def sandbox_endpoint_url(home: Path) -> str | None:
    """Where sandbox clusters' API calls go: nowhere special when a moto mock
    is active in this process (it intercepts them), else the loopback moto
    server the sandbox keeps running."""
    from infra.aws.client import in_process_mock_active

    if in_process_mock_active():
        return None
    from infra.sandbox import sandbox_endpoint

    return sandbox_endpoint(home)


def open_provisioner(
    region: str,
    *,
    profile: str | None = None,
    sandbox: bool = False,
    home: Path | None = None,
    endpoint_url: str | None = None,
    sleep: Callable[[float], None] | None = None,
    poll_seconds: float = 5.0,
    timeout_seconds: float = 1200.0,
) -> Ec2Provisioner:
    """An :class:`Ec2Provisioner` for ``region``.  ``endpoint_url`` overrides
    the endpoint (tests, custom moto servers); ``sandbox`` uses the sandbox's."""
    import time

    from infra.aws.client import AwsApi, AwsTarget
    from infra.aws.provisioner import Ec2Provisioner

    if sandbox and endpoint_url is None:
        from gpuflow.config import gpuflow_home

        endpoint_url = sandbox_endpoint_url(home or gpuflow_home())
    target = AwsTarget(region=region, profile=None if sandbox else profile, endpoint_url=endpoint_url, sandbox=sandbox)
    api = AwsApi(target, sleep=sleep or time.sleep)
    if sandbox:  # its instances are directories and processes on this machine: terminating them ends those too
        from infra.aws.provisioner import SandboxProvisioner

        return SandboxProvisioner(api, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
    return Ec2Provisioner(api, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
