"""The soak's world: two gpuflow homes (two owners) sharing one sandbox cloud, and
what the invariants look at (tests/infra/test_soak.py drives it).

* **One cloud, two owners.**  The sandbox keeps its moto server under a gpuflow
  home (``<home>/sandbox/.moto-server``) and there is no setting that points a
  second home at an existing endpoint.  Both homes' ``.moto-server`` are symlinks
  to one directory outside them, so both see — and serialise on — one server,
  as two people see one AWS account.
* **gpuflow is the CLI, in subprocesses** (``python -m gpuflow``), each in its own
  session: SIGKILL hits the gpuflow process only (as ``kill -9`` does), Ctrl-C
  is SIGINT to its whole process group (as a terminal sends it).  Every command
  has a bound; past it the soak records a hang and kills what it started.
* **Nothing reaches the internet.**  The commands get fake credentials and an
  HTTP(S) proxy on loopback that only records: a request gpuflow sends towards
  real AWS (instead of the sandbox's 127.0.0.1 endpoint, exempt via NO_PROXY)
  lands there and is reported as a violation.
* **Observation** goes around gpuflow: boto3 against the loopback endpoint for
  the cloud, the homes' state files for what each owner knows, /proc for the
  processes that run "on" sandbox instances (their working directory is inside
  ``<home>/sandbox/<cluster>/<instance-id>``).  Nothing here ever starts the
  sandbox server.  Linux only (/proc).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
OWNERS = ("A", "B")
REGIONS = ("us-east-1", "eu-west-1")
TAG_CLUSTER = "gpuflow:cluster"
TAG_OWNER_ID = "gpuflow:owner-id"
TAG_LAUNCH = "gpuflow:launch-id"
TAG_MANAGED = "gpuflow:managed"
FINISHED_RUN_STATES = ("succeeded", "failed")
# A child that a killed gpuflow left behind (its own bounded helpers: a copy, a
# 30 s "wait for the supervisor" loop) must be gone this long after the kill.
LEFTOVER_CHILD_BOUND = 40.0
SANDBOX_IDLE_SECONDS = 4.0


# ------------------------------------------------------------------ the recording proxy
class RecordingProxy:
    """An HTTP(S) proxy on 127.0.0.1 that forwards nothing: it records the first
    line of every request (``CONNECT ec2.us-east-1.amazonaws.com:443 ...``) and
    closes the connection.  gpuflow commands get it as HTTPS_PROXY/HTTP_PROXY."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="soak-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except (TimeoutError, socket.timeout, OSError):
                continue
            with connection:
                connection.settimeout(1.0)
                data = b""
                with contextlib.suppress(OSError):
                    data = connection.recv(1024)
                self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace") or "(empty request)")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close()


# ------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    cwd: str  # without " (deleted)"
    cwd_deleted: bool
    cmdline: str
    run_id_env: str | None  # GPUFLOW_RUN_ID from its environment, when readable


def _read_proc(pid: int) -> Proc | None:
    base = Path("/proc") / str(pid)
    try:
        cwd = os.readlink(base / "cwd")
        stat = (base / "stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        ppid, sid = int(fields[1]), int(fields[3])
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError, ValueError):
        return None
    run_id = None
    with contextlib.suppress(OSError):
        for entry in (base / "environ").read_bytes().split(b"\0"):
            if entry.startswith(b"GPUFLOW_RUN_ID="):
                run_id = entry.split(b"=", 1)[1].decode(errors="replace")
    deleted = cwd.endswith(" (deleted)")
    return Proc(pid, ppid, sid, cwd[: -len(" (deleted)")] if deleted else cwd, deleted, cmdline, run_id)


def processes_under(root: Path) -> list[Proc]:
    """Every live process whose working directory is (or was) under ``root``."""
    prefix = str(root) + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/{entry}/cwd").startswith(prefix):
                continue
        proc = _read_proc(int(entry))
        if proc is not None and (proc.cwd + "/").startswith(prefix):
            found.append(proc)
    return found


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    result: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in result:
                result.add(child)
                stack.append(child)
    return result


def pid_alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# ------------------------------------------------------------------ commands
@dataclass
class CommandResult:
    owner: str
    argv: tuple[str, ...]
    interrupt: tuple[str, float] | None
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    hung: bool
    interrupted: bool  # the signal was really sent (the command was still running)

    def describe(self) -> str:
        how = ""
        if self.interrupt:
            how = f" [{'SIGKILL' if self.interrupt[0] == 'kill' else 'Ctrl-C'} at {self.interrupt[1]:g}s" + (
                "" if self.interrupted else ", it had already ended"
            ) + "]"
        tail = (self.stderr.strip().splitlines() or [""])[-1][:300]
        return f"{self.owner}$ gpuflow {' '.join(self.argv)}{how} -> rc={self.returncode} ({self.seconds:.1f}s) {tail}"


# ------------------------------------------------------------------ the world
@dataclass
class Resources:
    """One owner's (or everyone's) live resources in the sandbox cloud."""

    instances: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (region, state)
    security_groups: dict[str, str] = field(default_factory=dict)  # id -> region
    key_pairs: dict[str, str] = field(default_factory=dict)  # name -> region
    volumes: dict[str, str] = field(default_factory=dict)  # unattached volume id -> region

    def ids(self) -> dict[str, Any]:
        return {
            "instances": dict(sorted(self.instances.items())),
            "security_groups": dict(sorted(self.security_groups.items())),
            "key_pairs": dict(sorted(self.key_pairs.items())),
            "volumes": dict(sorted(self.volumes.items())),
        }

    def empty(self) -> bool:
        return not (self.instances or self.security_groups or self.key_pairs or self.volumes)


@dataclass
class Item:
    kind: str  # instance | security-group | key-pair | volume
    resource_id: str
    region: str
    tags: dict[str, str]
    state: str = ""


class SoakWorld:
    """Two homes, two projects, one cloud directory, one recording proxy, all under ``root``."""

    def __init__(self, root: Path, command_bound: float = 45.0) -> None:
        self.root = root
        self.command_bound = command_bound
        self.cloud_dir = root / "cloud"
        self.cloud_dir.mkdir(parents=True)
        self.homes: dict[str, Path] = {}
        self.projects: dict[str, Path] = {}
        for owner in OWNERS:
            home = root / f"home-{owner}"
            (home / "sandbox").mkdir(parents=True)
            (home / "sandbox" / ".moto-server").symlink_to(self.cloud_dir, target_is_directory=True)
            self.homes[owner] = home
            project = root / f"project-{owner}"
            project.mkdir()
            (project / "gpuflow.toml").write_text("sandbox = true\n")
            self.projects[owner] = project
        self.proxy = RecordingProxy()
        # Every gpuflow command's pid (= its session id) -> when it ended: what its
        # children may still do must end within LEFTOVER_CHILD_BOUND of that.
        self.cli_ended: dict[int, float] = {}
        self._clients: dict[str, Any] = {}
        self.cleaned = False
        self._clients_port: int | None = None

    # -- gpuflow as a user runs it
    def environment(self, owner: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "GPUFLOW_")) and key.lower() not in ("http_proxy", "https_proxy", "no_proxy")
        }
        env.update(
            GPUFLOW_HOME=str(self.homes[owner]),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
            # Fake credentials, and a proxy that only records: anything meant for real AWS stops on loopback.
            AWS_ACCESS_KEY_ID="soak-fake-key",
            AWS_SECRET_ACCESS_KEY="soak-fake-secret",
            AWS_CONFIG_FILE=str(self.root / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.root / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            HTTPS_PROXY=self.proxy.url,
            HTTP_PROXY=self.proxy.url,
            https_proxy=self.proxy.url,
            http_proxy=self.proxy.url,
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            PYTHONDONTWRITEBYTECODE="1",
            # An empty, unused sandbox server exits by itself after this long (default 300 s).
            GPUFLOW_SANDBOX_IDLE_SECONDS=f"{SANDBOX_IDLE_SECONDS:g}",
        )
        return env

    def gpuflow(self, owner: str, argv: list[str], interrupt: tuple[str, float] | None = None) -> CommandResult:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "gpuflow", *argv],
            cwd=self.projects[owner],
            env=self.environment(owner),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        interrupted = False
        if interrupt is not None:
            how, delay = interrupt
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                if how == "kill":
                    os.kill(process.pid, signal.SIGKILL)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGINT)
                interrupted = True
        hung = False
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, self.command_bound - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            hung = True
            self.kill_tree(process.pid)
            stdout, stderr = process.communicate()
        self.cli_ended[process.pid] = time.monotonic()
        return CommandResult(
            owner, tuple(argv), interrupt, process.returncode, stdout.decode(errors="replace"),
            stderr.decode(errors="replace"), time.monotonic() - started, hung, interrupted,
        )

    @staticmethod
    def kill_tree(pid: int) -> None:
        for child in sorted(descendants(pid) | {pid}, reverse=True):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)

    # -- what each owner knows locally
    def owner_id(self, owner: str) -> str | None:
        path = self.homes[owner] / "owner-id"
        with contextlib.suppress(OSError):
            return path.read_text().strip() or None
        return None

    def records(self, owner: str, collection: str) -> dict[str, Any]:
        """state/<collection>/*.json of this owner (a torn or odd file reads as its error)."""
        directory = self.homes[owner] / "state" / collection
        documents: dict[str, Any] = {}
        if directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                try:
                    documents[path.stem] = json.loads(path.read_text())
                except (OSError, ValueError) as exc:
                    documents[path.stem] = {"_unreadable": str(exc)}
        return documents

    def run_ids(self) -> list[tuple[str, str]]:
        return sorted((owner, run_id) for owner in OWNERS for run_id in self.records(owner, "runs"))

    # -- the cloud, around gpuflow
    def server_record(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.cloud_dir / "server.json").read_text())
        return None

    def server_pids(self) -> list[int]:
        """Live sandbox servers started for this world (any record, or none)."""
        marker = f"--directory {self.root}/"
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = (Path("/proc") / entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if "infra.sandbox serve" in cmdline and marker in cmdline and pid_alive(int(entry)):
                        pids.append(int(entry))
        return pids

    def endpoint(self) -> str | None:
        record = self.server_record()
        if not record:
            return None
        port = int(record.get("port", 0))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            connection.request("GET", "/moto-api/")
            if connection.getresponse().status != 200:
                return None
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()
        return f"http://127.0.0.1:{port}"

    def _client(self, endpoint: str, region: str) -> Any:
        import boto3
        from botocore.config import Config

        port = int(endpoint.rsplit(":", 1)[1])
        if self._clients_port != port:
            self._clients, self._clients_port = {}, port
        if region not in self._clients:
            self._clients[region] = boto3.client(
                "ec2", region_name=region, endpoint_url=endpoint,
                aws_access_key_id="soak-observer", aws_secret_access_key="soak-observer",
                config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=20),
            )
        return self._clients[region]

    def cloud_items(self) -> tuple[bool, list[Item]]:
        """(server up, every live resource in both regions).  Terminated instances,
        the default security group and attached volumes are not "live resources"."""
        endpoint = self.endpoint()
        if endpoint is None:
            return False, []
        items: list[Item] = []
        for region in REGIONS:
            ec2 = self._client(endpoint, region)
            for reservation in ec2.describe_instances()["Reservations"]:
                for instance in reservation["Instances"]:
                    state = instance["State"]["Name"]
                    if state != "terminated":
                        items.append(Item("instance", instance["InstanceId"], region, _tags(instance), state))
            for group in ec2.describe_security_groups()["SecurityGroups"]:
                if group["GroupName"] != "default":
                    items.append(Item("security-group", group["GroupId"], region, _tags(group)))
            for pair in ec2.describe_key_pairs()["KeyPairs"]:
                items.append(Item("key-pair", pair["KeyName"], region, _tags(pair)))
            for volume in ec2.describe_volumes()["Volumes"]:
                if volume["State"] == "available" and _tags(volume).get(TAG_MANAGED):
                    items.append(Item("volume", volume["VolumeId"], region, _tags(volume), volume["State"]))
        return True, items

    def resources_of(self, items: list[Item], owner_id: str | None) -> Resources:
        resources = Resources()
        for item in items:
            if owner_id is None or item.tags.get(TAG_OWNER_ID) != owner_id:
                continue
            if item.kind == "instance":
                resources.instances[item.resource_id] = (item.region, item.state)
            elif item.kind == "security-group":
                resources.security_groups[item.resource_id] = item.region
            elif item.kind == "key-pair":
                resources.key_pairs[item.resource_id] = item.region
            else:
                resources.volumes[item.resource_id] = item.region
        return resources

    # -- the owner's own janitor's view (gpuflow's reap, as a dry run, in this process)
    def reap_dry_run(self, owner: str, region: str, endpoint: str) -> set[str]:
        """The resource ids ``gpuflow reap --sandbox --region REGION`` (no --yes)
        would list for ``owner``: gpuflow's own classification, run in this
        process against the shared endpoint, without its side effect of stopping
        the sandbox server (which would change what the soak observes)."""
        from unittest import mock

        from gpuflow import clusters
        from gpuflow.provisioner import open_provisioner

        def factory(scan_region: str, *, profile: str | None = None, sandbox: bool = False) -> Any:
            return open_provisioner(scan_region, sandbox=True, endpoint_url=endpoint, poll_seconds=0.05, timeout_seconds=30)

        overrides = {"GPUFLOW_HOME": str(self.homes[owner]), "AWS_ACCESS_KEY_ID": "soak-observer",
                     "AWS_SECRET_ACCESS_KEY": "soak-observer"}
        with mock.patch.dict(os.environ, overrides):  # restored whole on exit, GPUFLOW_OWNER_ID included
            os.environ.pop("GPUFLOW_OWNER_ID", None)  # each home's own id, as the commands see it
            with mock.patch.object(clusters, "_release_sandbox_server_when_unused", lambda *a, **k: None, create=True):
                report = clusters.reap(yes=False, region=region, sandbox=True, provisioner_factory=factory)
        return {item.resource_id for item in report.items}


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", []) or []}


def known_locally(world: SoakWorld, owner: str, item: Item) -> bool:
    """The owner's cluster records account for this resource: a live record
    (up, or creating) of its cluster in its region, of the same launch."""
    name = item.tags.get(TAG_CLUSTER)
    if not name:
        return False
    document = world.records(owner, "clusters").get(name)
    if not isinstance(document, dict) or document.get("phase") not in ("up", "creating"):
        return False
    if document.get("region") != item.region:
        return False
    launch = item.tags.get(TAG_LAUNCH)
    if launch and document.get("launch_id") == launch:
        return True
    nodes = {node.get("instance_id") for node in document.get("nodes", []) if isinstance(node, dict)}
    return item.resource_id in nodes | {document.get("security_group_id"), document.get("key_name")}


# ------------------------------------------------------------------ processes on sandbox instances
@dataclass(frozen=True)
class NodeProc:
    proc: Proc
    owner: str
    cluster: str
    instance_id: str
    node_dir: Path
    run_id: str | None


def node_processes(world: SoakWorld) -> list[NodeProc]:
    """Processes running "on" a sandbox instance of either home (by working directory)."""
    result = []
    for proc in processes_under(world.root):
        for owner, home in world.homes.items():
            sandbox = home / "sandbox"
            try:
                parts = Path(proc.cwd).relative_to(sandbox).parts
            except ValueError:
                continue
            if len(parts) < 2 or parts[0].startswith("."):
                continue
            node_dir = sandbox / parts[0] / parts[1]
            result.append(NodeProc(proc, owner, parts[0], parts[1], node_dir, _run_of(proc, node_dir, parts)))
    return result


def _run_of(proc: Proc, node_dir: Path, parts: tuple[str, ...]) -> str | None:
    """Which run a process on a node belongs to: its GPUFLOW_RUN_ID, the run
    directory it works in, or the run whose supervisor/job leads its session."""
    if proc.run_id_env:
        return proc.run_id_env
    if len(parts) >= 4 and parts[2] == "runs":
        return parts[3]
    for pid_file in node_dir.glob("runs/*/*.pid"):
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text().strip()) in (proc.sid, proc.pid):
                return pid_file.parent.name
    return None


def leads_run(node: NodeProc) -> bool:
    """The run's job or its supervisor (the pids in job.pid / supervisor.pid), not
    one of the supervisor's short-lived helpers (the environment probe, a sleep)."""
    if node.run_id is None:
        return False
    for name in ("job.pid", "supervisor.pid"):
        with contextlib.suppress(OSError, ValueError):
            if int((node.node_dir / "runs" / node.run_id / name).read_text().strip()) == node.proc.pid:
                return True
    return False
