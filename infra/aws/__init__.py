"""AWS access for gpuflow: the only place that imports boto3.

:func:`open_provisioner` opens a provisioner for one endpoint (real AWS, the
sandbox's loopback moto server, or an in-process moto mock) so that exactly
the same provisioning code runs against all three.  gpuflow's use cases reach
it through their cloud port, :func:`gpuflow.provisioner.open_provisioner`,
which supplies what only gpuflow knows (its home, how a sandbox instance is
discarded).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from infra.aws.provisioner import Ec2Provisioner
    from infra.sandbox.provisioner import DiscardInstance


def sandbox_endpoint_url(home: Path, discard_command: list[str] | None = None) -> str | None:
    """Where sandbox clusters' API calls go: nowhere special when gpuflow's
    in-process moto mock is active (it intercepts them), else the loopback moto
    server the sandbox keeps running for ``home``."""
    from infra.aws.client import in_process_mock_active

    if in_process_mock_active():
        return None
    from infra.sandbox import sandbox_endpoint

    return sandbox_endpoint(home, discard_command=discard_command)


def open_provisioner(
    region: str,
    *,
    profile: str | None = None,
    sandbox: bool = False,
    home: Path | None = None,
    discard_instance: DiscardInstance | None = None,
    discard_command: list[str] | None = None,
    endpoint_url: str | None = None,
    sleep: Callable[[float], None] | None = None,
    poll_seconds: float = 5.0,
    timeout_seconds: float = 1200.0,
) -> Ec2Provisioner:
    """An :class:`Ec2Provisioner` for ``region``.  ``endpoint_url`` overrides
    the endpoint (tests, custom moto servers); ``sandbox`` uses the sandbox's
    (the one of gpuflow home ``home``) and returns a
    :class:`~infra.sandbox.provisioner.SandboxProvisioner`, which discards each
    instance it terminates with ``discard_instance`` (and a sandbox server it starts
    runs ``discard_command INSTANCE_ID CLUSTER`` for instances it reclaims itself:
    simulated spot interruptions)."""
    if sandbox and discard_instance is None:
        raise TypeError("open_provisioner(sandbox=True) needs discard_instance (what ends a sandbox instance's "
                        "processes and directory): gpuflow.provisioner.open_provisioner passes it")
    import time

    from infra.aws.client import AwsApi, AwsTarget
    from infra.aws.provisioner import Ec2Provisioner

    if sandbox and endpoint_url is None:
        if home is None:
            raise TypeError("open_provisioner(sandbox=True) needs home (whose sandbox server) or endpoint_url")
        endpoint_url = sandbox_endpoint_url(home, discard_command)
    target = AwsTarget(region=region, profile=None if sandbox else profile, endpoint_url=endpoint_url, sandbox=sandbox)
    api = AwsApi(target, sleep=sleep or time.sleep)
    if sandbox:  # its instances are directories and processes on this machine: terminating them ends those too
        from infra.sandbox.provisioner import SandboxProvisioner

        return SandboxProvisioner(
            api, discard_instance=discard_instance, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds
        )
    return Ec2Provisioner(api, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
