"""What a test left behind in its sandbox: found, described, removed.

The fake cloud and the gpuflow home belong to one test, so *everything* in
them is the test's: every instance not terminated, every security group but
the default one, every key pair, every launch template, every open spot request, every EBS
volume not attached (a root volume goes with its instance), every sandbox
instance directory, every process running a job of this home's sandbox,
a detached sandbox server started with this home, and every shared SSH
connection (`gpuflow ssh`'s ControlMaster) of this home still open.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuflow import procs
from gpuflow.config import gpuflow_home
from gpuflow.transport import openssh

SERVER_DIRECTORY = ".moto-server"  # infra.sandbox.SERVER_DIRECTORY_NAME, not a sandbox instance


class LeakKind(enum.Enum):
    INSTANCE = "instance"
    SPOT_REQUEST = "spot request"
    SECURITY_GROUP = "security group"
    KEY_PAIR = "key pair"
    LAUNCH_TEMPLATE = "launch template"
    VOLUME = "volume"
    SANDBOX_DIRECTORY = "sandbox directory"
    JOB_PROCESS = "job process"
    SANDBOX_SERVER = "sandbox server"
    SSH_MASTER = "shared SSH connection"


@dataclass(frozen=True)
class Leftover:
    kind: LeakKind
    identifier: str  # the instance / group / request id, the key pair's name, the directory, the pid
    detail: str = ""  # where and what: region, cluster, state, command line
    region: str | None = None

    def describe(self) -> str:
        return f"{self.kind.value} {self.identifier}" + (f" ({self.detail})" if self.detail else "")


# --------------------------------------------------------------------------- the fake cloud
def _tag(tags: Iterable[dict] | None, key: str) -> str | None:
    return next((tag.get("Value") for tag in tags or () if tag.get("Key") == key), None)


def cloud_leftovers(client: Callable[[str, str], Any], regions: Iterable[str]) -> list[Leftover]:
    """Every live resource of the fake cloud in ``regions`` (``client(service, region)``)."""
    found: list[Leftover] = []
    for region in sorted(set(regions)):
        ec2 = client("ec2", region)
        for reservation in ec2.describe_instances()["Reservations"]:
            for instance in reservation["Instances"]:
                state = instance["State"]["Name"]
                if state == "terminated":
                    continue
                cluster = _tag(instance.get("Tags"), "gpuflow:cluster")
                where = f"cluster {cluster}, " if cluster else ""
                found.append(Leftover(LeakKind.INSTANCE, instance["InstanceId"], f"{where}{region}, {state}", region))
        for request in ec2.describe_spot_instance_requests()["SpotInstanceRequests"]:
            if request.get("State") in ("open", "active"):
                found.append(Leftover(LeakKind.SPOT_REQUEST, request["SpotInstanceRequestId"],
                                      f"{region}, {request['State']}", region))
        for group in ec2.describe_security_groups()["SecurityGroups"]:
            if group.get("GroupName") == "default":
                continue
            found.append(Leftover(LeakKind.SECURITY_GROUP, group["GroupId"], f"{group.get('GroupName')}, {region}", region))
        for pair in ec2.describe_key_pairs()["KeyPairs"]:
            found.append(Leftover(LeakKind.KEY_PAIR, pair["KeyName"], region, region))
        for template in ec2.describe_launch_templates()["LaunchTemplates"]:
            found.append(Leftover(LeakKind.LAUNCH_TEMPLATE, template["LaunchTemplateId"],
                                  f"{template.get('LaunchTemplateName')}, {region}", region))
        for volume in ec2.describe_volumes()["Volumes"]:
            if volume.get("State") in ("in-use", "deleting", "deleted"):  # in use: its instance is the leak
                continue
            found.append(Leftover(LeakKind.VOLUME, volume["VolumeId"],
                                  f"{volume.get('Size')} GiB, {volume.get('AvailabilityZone')}, {volume.get('State')}", region))
    return found


def remove_cloud_leftovers(client: Callable[[str, str], Any], leftovers: Iterable[Leftover]) -> list[str]:
    """Remove what :func:`cloud_leftovers` found (instances first: their groups are in use); returns failures."""
    failures: list[str] = []
    by_kind: dict[LeakKind, list[Leftover]] = {}
    for item in leftovers:
        by_kind.setdefault(item.kind, []).append(item)

    def attempt(item: Leftover, action: Callable[[Any], object]) -> None:
        try:
            action(client("ec2", str(item.region)))
        except Exception as exc:  # noqa: BLE001 - reported with the leak, never hides it
            failures.append(f"{item.describe()}: {exc}")

    for item in by_kind.get(LeakKind.SPOT_REQUEST, []):
        attempt(item, lambda ec2, i=item: ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[i.identifier]))
    for item in by_kind.get(LeakKind.INSTANCE, []):
        attempt(item, lambda ec2, i=item: ec2.terminate_instances(InstanceIds=[i.identifier]))
    for item in by_kind.get(LeakKind.SECURITY_GROUP, []):
        attempt(item, lambda ec2, i=item: ec2.delete_security_group(GroupId=i.identifier))
    for item in by_kind.get(LeakKind.KEY_PAIR, []):
        attempt(item, lambda ec2, i=item: ec2.delete_key_pair(KeyName=i.identifier))
    for item in by_kind.get(LeakKind.LAUNCH_TEMPLATE, []):
        attempt(item, lambda ec2, i=item: ec2.delete_launch_template(LaunchTemplateId=i.identifier))
    for item in by_kind.get(LeakKind.VOLUME, []):
        attempt(item, lambda ec2, i=item: ec2.delete_volume(VolumeId=i.identifier))
    return failures


# --------------------------------------------------------------------------- this machine
def sandbox_root(home: Path | None = None) -> Path:
    return (home or gpuflow_home()) / "sandbox"


def sandbox_directories(home: Path | None = None) -> list[Path]:
    """``<home>/sandbox/<cluster>/<instance>``: every sandbox instance's directory still on disk."""
    root = sandbox_root(home)
    if not root.is_dir():
        return []
    found = []
    for cluster_dir in sorted(root.iterdir()):
        if cluster_dir.name == SERVER_DIRECTORY or not cluster_dir.is_dir():
            continue
        instance_dirs = sorted(path for path in cluster_dir.iterdir() if path.is_dir())
        found.extend(instance_dirs or ([cluster_dir] if any(cluster_dir.iterdir()) else []))
    return found


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = [word.decode(errors="replace") for word in raw.split(b"\0") if word]
    text = " ".join(words)
    return text if len(text) <= 120 else text[:117] + "..."


def job_pids(home: Path | None = None) -> list[int]:
    """Every live process running a job of this home's sandbox: the proven supervisors
    and jobs recorded in each run directory, and (Linux) every process whose
    environment names a run directory under the sandbox (children a job left)."""
    root = sandbox_root(home)
    pids: set[int] = set()
    for instance_dir in sandbox_directories(home):
        runs_dir = instance_dir / "runs"
        if not runs_dir.is_dir():
            continue
        for run_dir in runs_dir.iterdir():
            for record_name in (procs.SUPERVISOR_RECORD, procs.JOB_RECORD):
                pid = procs.proven(str(run_dir / record_name))
                if pid is not None:
                    pids.add(pid)
    for prefix in {str(root), os.path.realpath(root)}:
        pids.update(procs.marked(prefix, exact=False))
    pids.discard(os.getpid())
    return sorted(pid for pid in pids if procs.identity(pid) is not None)


def local_leftovers(home: Path | None = None, *, server_alive: Callable[[Path], int | None]) -> list[Leftover]:
    """Job processes, sandbox directories, a live sandbox server and open shared SSH connections of ``home``."""
    home = home or gpuflow_home()
    found = [Leftover(LeakKind.JOB_PROCESS, str(pid), _command_line(pid)) for pid in job_pids(home)]
    found += [Leftover(LeakKind.SANDBOX_DIRECTORY, str(path)) for path in sandbox_directories(home)]
    server_pid = server_alive(home)
    if server_pid is not None:
        found.append(Leftover(LeakKind.SANDBOX_SERVER, str(server_pid), "a detached moto server of this home"))
    found += [Leftover(LeakKind.SSH_MASTER, path, "its socket; `gpuflow down` closes it") for path in openssh.master_sockets(str(home))]
    return found


def remove_local_leftovers(home: Path | None = None, *, stop_server: Callable[[Path], object]) -> list[str]:
    """Close the home's shared SSH connections, kill every job process (SIGKILL, as a terminated
    instance's), delete the sandbox directories, stop the home's sandbox server; returns failures."""
    home = home or gpuflow_home()
    failures: list[str] = []
    openssh.close_masters(str(home))
    for instance_dir in sandbox_directories(home):
        procs.terminate_base(str(instance_dir))
    for pid in job_pids(home):  # marked processes outside any directory still on disk
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    for path in sandbox_directories(home):
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            failures.append(f"sandbox directory {path} could not be deleted")
    try:
        stop_server(home)
    except Exception as exc:  # noqa: BLE001 - reported with the leak
        failures.append(f"stopping the sandbox server failed: {exc}")
    return failures


def leak_message(leftovers: list[Leftover], failures: list[str], *, test_id: str) -> str:
    """One message naming every leftover (one line each) and what could not be removed."""
    lines = [
        f"gpuflow_sandbox: {test_id} left {len(leftovers)} thing(s) behind "
        "(removed now; `gpuflow_sandbox.down()` every cluster it brings up, and let every run end):"
    ]
    lines += [f"  - {item.describe()}" for item in leftovers]
    if failures:
        lines.append("could not remove:")
        lines += [f"  - {failure}" for failure in failures]
    return "\n".join(lines)
