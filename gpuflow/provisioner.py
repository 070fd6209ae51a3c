"""gpuflow's cloud port: the one factory that opens a provisioner (AWS or the sandbox), with what only gpuflow knows.

The use cases are written against :class:`infra.port.Provisioner` (re-exported
here with :data:`ProvisionerFactory`), never against boto3.
:func:`open_provisioner` is where AWS versus the sandbox is chosen, once: for
the sandbox it hands infra what only gpuflow knows -- its home (whose sandbox
server) and how a terminated sandbox instance's jobs and directory are
discarded (:func:`discard_terminated_sandbox_instance`).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpuflow import procs
from gpuflow.config import gpuflow_home
from gpuflow.errors import UsageError
from gpuflow.state import validate_name
from infra.account_stack import STACK_NAME
from infra.port import WORKER_PORT_RANGE, Provisioner, ProvisionerFactory


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
) -> Provisioner:
    """A provisioner for ``region``: EC2, or with ``sandbox`` the sandbox's (its
    moto endpoint for gpuflow home ``home``, default the current one, unless
    ``endpoint_url`` overrides it).  ``sleep``, ``poll_seconds`` and
    ``timeout_seconds`` are injectable so tests never wait."""
    from infra.aws import open_provisioner as open_aws_provisioner

    home = Path(home) if home is not None else gpuflow_home()

    def discard(instance_id: str, cluster: str | None) -> None:
        discard_terminated_sandbox_instance(instance_id, cluster, home=home)

    return open_aws_provisioner(
        region,
        profile=profile,
        sandbox=sandbox,
        home=home,
        discard_instance=discard if sandbox else None,
        discard_command=discard_command(home) if sandbox else None,
        endpoint_url=endpoint_url,
        sleep=sleep,
        poll_seconds=poll_seconds,
        timeout_seconds=timeout_seconds,
    )


@contextlib.contextmanager
def in_process_cloud(regions: tuple[str, ...], *, home: Path | None = None) -> Iterator[Any]:
    """The sandbox cloud inside this process (:func:`infra.sandbox.in_process_sandbox`) for
    gpuflow home ``home`` (default: the current one): this process also hosts each sandbox
    instance's IMDS and carries out simulated interruptions, discarding a reclaimed
    instance as the sandbox provisioner does (:func:`discard_terminated_sandbox_instance`)."""
    from infra.sandbox import in_process_sandbox

    home = Path(home) if home is not None else gpuflow_home()

    def discard(instance_id: str, cluster: str | None) -> None:
        discard_terminated_sandbox_instance(instance_id, cluster, home=home)

    with in_process_sandbox(regions, sandbox_root=home / "sandbox", discard_instance=discard) as amis:
        yield amis


def cloud_for_one_shot_run(region: str, *, home: Path | None = None) -> Any:
    """The sandbox cloud of ``run --up --sandbox --down`` (launch, run, tear down in one go):
    the running sandbox server of this home when it holds the account stack in ``region``
    (``gpuflow setup --sandbox``) -- the node's upload sidecar, another process, reaches its
    S3, so the run is durable and can be recovered -- else the cloud inside this process
    (:func:`in_process_cloud`), which vanishes with it and leaves nothing behind."""
    from infra.sandbox.server import server_holding_stack

    home = Path(home) if home is not None else gpuflow_home()
    if server_holding_stack(home, region, STACK_NAME) is not None:
        return contextlib.nullcontext()
    return in_process_cloud((region,), home=home)


def release_emptied_sandbox(home: Path | None = None) -> bool:
    """Stop this home's sandbox server when a command just emptied it and nothing else uses
    it (:func:`infra.sandbox.server.release_emptied_server`); whether it was stopped."""
    from infra.sandbox.server import release_emptied_server

    return release_emptied_server(Path(home) if home is not None else gpuflow_home())


def discard_command(home: Path) -> list[str]:
    """The command a sandbox server (a process that imports nothing from gpuflow) runs,
    with ``INSTANCE_ID CLUSTER`` appended, to discard an instance it reclaims itself
    (a simulated spot interruption): :func:`discard_terminated_sandbox_instance`."""
    return [sys.executable, "-m", "gpuflow.provisioner", "discard", str(Path(home).resolve())]


def discard_sandbox_instance(cluster_name: str, instance_id: str, *, home: Path | None = None) -> None:
    """What EC2 termination does to a real instance, done to a sandbox one:
    every job and supervisor running "on" it is killed (their process groups,
    and on Linux every process carrying a run's marker, as a power-off would)
    and its "disk" — the sandbox directory — is deleted.  Only processes proven
    to be its runs' are signalled (:func:`gpuflow.procs.terminate_base`): a
    pid file naming a process that merely reused the pid kills nothing."""
    root = (home or gpuflow_home()) / "sandbox"
    directory = root / validate_name(cluster_name, "cluster name") / validate_name(instance_id, "instance id")
    if not directory.is_dir():
        return
    procs.terminate_base(str(directory))
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()  # the cluster's directory, once its last node is gone


def discard_terminated_sandbox_instance(instance_id: str, cluster: str | None, *, home: Path | None = None) -> None:
    """The sandbox provisioner's ``discard_instance``: discard the instance in
    the directory of its cluster (its ``gpuflow:cluster`` tag), or, for an
    instance the fake cloud no longer knows (its server was restarted), in every
    cluster directory holding a directory named by that instance id."""
    home = home or gpuflow_home()
    for name in _sandbox_clusters_of(home, instance_id, cluster):
        discard_sandbox_instance(name, instance_id, home=home)


def _sandbox_clusters_of(home: Path, instance_id: str, tagged: str | None) -> list[str]:
    try:
        validate_name(instance_id, "instance id")
        if tagged is not None:
            return [validate_name(tagged, "cluster name")]
    except UsageError:  # a tag gpuflow did not write: no directory of ours can match it
        return []
    root = home / "sandbox"
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir() if not path.name.startswith(".") and (path / instance_id).is_dir())


def main(argv: list[str]) -> int:
    """``python -m gpuflow.provisioner discard HOME INSTANCE_ID CLUSTER`` (:func:`discard_command`)."""
    if len(argv) != 4 or argv[0] != "discard":
        print("usage: python -m gpuflow.provisioner discard HOME INSTANCE_ID CLUSTER", file=sys.stderr)
        return 2
    _command, home, instance_id, cluster = argv
    discard_terminated_sandbox_instance(instance_id, cluster or None, home=Path(home))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = [
    "Provisioner",
    "ProvisionerFactory",
    "WORKER_PORT_RANGE",
    "discard_command",
    "in_process_cloud",
    "discard_sandbox_instance",
    "discard_terminated_sandbox_instance",
    "open_provisioner",
]
