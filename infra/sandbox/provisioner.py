"""The sandbox cloud's provisioner: moto's EC2, plus what moto cannot do to a terminated instance.

A sandbox "instance" is a directory and processes on this machine, which gpuflow
made; so terminating one must end those too, whichever use case terminates it
(``down``, ``reap``, ``run --down``, an ``up`` rolled back).  What that takes
(which directory, which processes are its) is gpuflow's knowledge: the factory
that picks this provisioner passes it in as ``discard_instance``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from infra.aws.client import AwsApi
from infra.aws.provisioner import Ec2Provisioner

DiscardInstance = Callable[[str, "str | None"], None]
"""``discard_instance(instance_id, cluster)``: end the sandbox instance's processes and
delete its directory; ``cluster`` is its ``gpuflow:cluster`` tag, or None when the fake
cloud no longer knows the instance (its server was restarted)."""


class SandboxProvisioner(Ec2Provisioner):
    """:class:`~infra.aws.provisioner.Ec2Provisioner` against the sandbox's moto,
    whose :meth:`terminate` first discards each instance (``discard_instance``)."""

    def __init__(
        self,
        api: AwsApi,
        *,
        discard_instance: DiscardInstance,
        poll_seconds: float = 5.0,
        timeout_seconds: float = 1200.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(api, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds, clock=clock)
        self.discard_instance = discard_instance

    def spot_role_exists(self) -> bool | None:
        """The sandbox's spot launches need no IAM role: moto starts them without one."""
        return True

    def terminate(self, instance_ids: Sequence[str]) -> None:
        tagged = {view.instance_id: view.cluster for view in self.describe_instances(instance_ids)}
        # Jobs and directory first: gpuflow killed in between then leaves a running instance
        # with nothing on it (the next `down` terminates it), never jobs on a terminated one.
        for instance_id in instance_ids:
            self.discard_instance(instance_id, tagged.get(instance_id))
        super().terminate(instance_ids)


__all__ = ["DiscardInstance", "SandboxProvisioner"]
