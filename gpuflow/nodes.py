"""Reaching a cluster's nodes: how a cluster becomes a command runner, an SSH target, a `gpuflow ssh` command line.

"Which machine" (a :class:`Cluster`) becomes "how to reach it" here, and only
here is it decided whether a node is a sandbox directory, a sandbox node behind
the configured loopback sshd, or a cloud instance over SSH (:func:`access_for`):

* :func:`ssh_target_for` — the :class:`SSHTarget` of a node (address, user,
  key, the cluster's pinned known_hosts ``$GPUFLOW_HOME/known_hosts/<cluster>``);
* :func:`runner_for` — the runner factory: a :class:`CommandRunner` for a node:
  an ``SSHRunner`` with pinned host keys for a real instance; for a sandbox
  cluster a ``LocalRunner`` in ``$GPUFLOW_HOME/sandbox/<cluster>/<instance-id>``,
  or, when a loopback sshd is configured for the sandbox (``GPUFLOW_SANDBOX_SSH``
  or the ``sandbox_ssh`` project setting), an ``SSHRunner`` to it using that
  directory as its base;
* :func:`openssh_argv` — the system ``ssh`` command line with the same pinning
  (used by ``gpuflow ssh`` and by rsync's ``-e``); :mod:`gpuflow.ssh_config`
  writes the same settings for plain ``ssh``.

A sandbox node is reached only while the sandbox's cloud still runs its
instance (:func:`refuse_if_gone`), as a terminated EC2 instance cannot be
reached; a real instance is asked only when a connection to it fails.

Host keys are pinned lazily: the first time a node is reached, its host keys
are read from the instance's console output (cloud-init prints them there at
first boot) and written to the cluster's known_hosts.

What this layer asks the cloud (an instance's state, its console) it asks a
:class:`CloudProbe` it is given (the cluster use cases build one:
:func:`gpuflow.clusters.cloud_probe`); without one, :class:`ProvisionerProbe`
opens the default provisioner.  Nothing here imports the use cases, nor
paramiko or boto3 at module level.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from gpuflow.config import gpuflow_home, project_config
from gpuflow.errors import ConfigError, GpuflowError, InstanceGone, UnreachableHost, UsageError
from gpuflow.hints import command_hint
from gpuflow.provisioner import Provisioner, ProvisionerFactory, discard_sandbox_instance, open_provisioner
from gpuflow.records import Cluster, Node, SSHTarget
from gpuflow.state import validate_name
from gpuflow.transport import hostkeys, openssh, shared
from gpuflow.transport.base import CommandRunner, quote_argv
from gpuflow.transport.local import LocalRunner
from gpuflow.transport.openssh import SERVER_ALIVE_INTERVAL
from gpuflow.transport.keys import check_key_permissions
from gpuflow.transport.ssh import SSHRunner

ENV_SANDBOX_SSH = "GPUFLOW_SANDBOX_SSH"
_ALIVE_STATES = ("pending", "running")


# ---------------------------------------------------------------------- where things live


def known_hosts_path(cluster_name: str) -> Path:
    """The cluster's own known_hosts: its pinned host keys and nothing else."""
    return gpuflow_home() / "known_hosts" / validate_name(cluster_name, "cluster name")


def sandbox_directory(cluster: Cluster, node: Node | None = None) -> Path:
    """``$GPUFLOW_HOME/sandbox/<cluster>/<instance-id>``: the sandbox instance's gpuflow directory."""
    node = node or cluster.head
    return gpuflow_home() / "sandbox" / validate_name(cluster.name, "cluster name") / validate_name(
        node.instance_id, "instance id"
    )


def discard_sandbox_node(cluster: Cluster, node: Node) -> None:
    """What EC2 termination does to a real instance, done to a sandbox one."""
    discard_sandbox_instance(cluster.name, node.instance_id)


# ---------------------------------------------------------------------- the sandbox's loopback sshd


@dataclass(frozen=True)
class SandboxSSH:
    """A loopback sshd that plays the sandbox's instances (tests, and users who
    want the sandbox to go through real SSH)."""

    host: str
    port: int
    user: str
    key_path: str
    host_key: hostkeys.PublicHostKey


def sandbox_ssh_settings(
    environ: Mapping[str, str] | None = None, settings: Mapping[str, Any] | None = None, *, project_dir: Path | None = None
) -> SandboxSSH | None:
    """The configured loopback sshd for the sandbox, or None.

    ``GPUFLOW_SANDBOX_SSH="host=127.0.0.1,port=2222,user=me,key=/path/key,host_key=/path/host_key.pub"``
    or a ``[sandbox_ssh]`` table with the same keys in the config of the project
    at ``project_dir`` (``settings``: that table, given directly).
    ``host_key`` is the server's public host key file (or the key text); it is
    pinned as given.  Only loopback hosts are accepted: the sandbox must never
    send anything off this machine.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_SANDBOX_SSH, "").strip()
    source = ENV_SANDBOX_SSH
    values: Mapping[str, Any]
    if raw:
        values = {}
        for item in raw.split(","):
            key, separator, value = item.partition("=")
            if not separator:
                raise ConfigError(f"{ENV_SANDBOX_SSH}: expected key=value items separated by commas, got {item!r}")
            values[key.strip().replace("-", "_")] = value.strip()  # type: ignore[index]
    else:
        if settings is None:
            configured = project_config(project_dir).sandbox_ssh  # typed and validated by the reader
            settings = {} if configured is None else {k: v for k, v in asdict(configured).items() if v is not None}
        if not settings:
            return None
        values = {str(key).replace("-", "_"): value for key, value in settings.items()}
        source = "the sandbox_ssh setting"
    missing = [key for key in ("port", "user", "key", "host_key") if not values.get(key)]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}")
    host = str(values.get("host") or "127.0.0.1")
    if not _is_loopback(host):
        raise ConfigError(
            f"{source}: host {host!r} is not a loopback address",
            hint="the sandbox only ever talks to 127.0.0.1",
        )
    try:
        port = int(values["port"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: port {values['port']!r} is not a number") from exc
    host_key_value = str(values["host_key"])
    host_key_file = Path(host_key_value).expanduser()
    try:
        key_text = host_key_file.read_text() if host_key_file.is_file() else host_key_value
        host_key = hostkeys.parse_public_key(key_text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: host_key is neither a public key file nor a public key ({exc})") from exc
    return SandboxSSH(host, port, str(values["user"]), str(Path(str(values["key"])).expanduser()), host_key)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- what is asked of the cloud


class CloudProbe(Protocol):
    """What reaching a node asks the cloud: is the instance still there, what did its console print."""

    def instance_state(self, cluster: Cluster, instance_id: str) -> str:
        """'pending', 'running', 'terminated', ..., or 'not-found'."""
        ...

    def console_output(self, cluster: Cluster, instance_id: str) -> str:
        """The instance's console text (cloud-init prints its SSH host keys there)."""
        ...


@dataclass(frozen=True)
class ProvisionerProbe:
    """A :class:`CloudProbe` through a provisioner of the cluster's own place (region,
    profile, sandbox); ``provisioner_factory`` None opens the default one."""

    provisioner_factory: ProvisionerFactory | None = None

    def _provisioner(self, cluster: Cluster) -> Provisioner:
        if self.provisioner_factory is not None:
            return self.provisioner_factory(cluster.region, profile=cluster.profile, sandbox=cluster.sandbox)
        return open_provisioner(cluster.region, profile=cluster.profile, sandbox=cluster.sandbox)  # the cloud port

    def instance_state(self, cluster: Cluster, instance_id: str) -> str:
        return self._provisioner(cluster).instance_state(instance_id)

    def console_output(self, cluster: Cluster, instance_id: str) -> str:
        return self._provisioner(cluster).console_output(instance_id)


# ---------------------------------------------------------------------- how a node is reached


class Reach(enum.Enum):
    """How gpuflow reaches a cluster's nodes: decided once, by :func:`access_for`."""

    DIRECTORY = "directory"  # a sandbox node without a loopback sshd: its directory on this machine
    LOOPBACK_SSH = "loopback-ssh"  # a sandbox node through the configured loopback sshd
    SSH = "ssh"  # a cloud instance over SSH, with host keys pinned from its console


@dataclass(frozen=True)
class Access:
    """How to reach the nodes of one cluster (and the loopback sshd, for :attr:`Reach.LOOPBACK_SSH`)."""

    reach: Reach
    sandbox_ssh: SandboxSSH | None = None


def access_for(cluster: Cluster, *, project_dir: Path | None = None) -> Access:
    """The one place that decides how ``cluster``'s nodes are reached: its record
    says whether it is a sandbox cluster, the configuration (``$GPUFLOW_SANDBOX_SSH``,
    else the config of the project at ``project_dir``) whether a loopback sshd
    plays the sandbox's instances."""
    if not cluster.sandbox:
        return Access(Reach.SSH)
    sandbox = sandbox_ssh_settings(project_dir=project_dir)
    return Access(Reach.DIRECTORY) if sandbox is None else Access(Reach.LOOPBACK_SSH, sandbox)


def select_node(cluster: Cluster, instance_id: str | None = None) -> Node:
    """The head node, or the node with ``instance_id``."""
    if instance_id is None:
        return cluster.head
    for node in cluster.nodes:
        if node.instance_id == instance_id:
            return node
    raise UsageError(
        f"cluster {cluster.name!r} has no instance {instance_id!r}",
        hint=f"its instances: {', '.join(node.instance_id for node in cluster.nodes) or 'none'}",
    )


# ---------------------------------------------------------------------- targets and runners


def ssh_target_for(
    cluster: Cluster, node: Node | None = None, *, trust_on_first_use: bool = False, project_dir: Path | None = None
) -> SSHTarget:
    """How to reach ``node`` (default: the head) over SSH.

    For a sandbox cluster this is the configured loopback sshd; a sandbox
    without one has no SSH target (:class:`UsageError`).
    """
    return _target(cluster, node or cluster.head, access_for(cluster, project_dir=project_dir), trust_on_first_use)


def _target(cluster: Cluster, node: Node, access: Access, trust_on_first_use: bool) -> SSHTarget:
    known_hosts = str(known_hosts_path(cluster.name))
    if access.reach is Reach.DIRECTORY:
        raise UsageError(
            f"sandbox cluster {cluster.name!r} runs on this machine, not over SSH",
            hint=f"set {ENV_SANDBOX_SSH} to reach it through a loopback sshd",
        )
    if access.reach is Reach.LOOPBACK_SSH:
        sandbox = access.sandbox_ssh
        assert sandbox is not None
        return SSHTarget(
            host=sandbox.host,
            port=sandbox.port,
            user=sandbox.user,
            key_path=sandbox.key_path,
            known_hosts_path=known_hosts,
            trust_on_first_use=False,
        )
    address = node.public_ip or node.private_ip
    if not address:
        raise UnreachableHost(
            f"instance {node.instance_id} of cluster {cluster.name!r} has no IP address (state: {node.state})",
            hint=f"wait for it to start: {command_hint(f'status {cluster.name}', cluster.sandbox)}",
        )
    return SSHTarget(
        host=address,
        port=int(cluster.ssh_port),
        user=cluster.ssh_user,
        key_path=cluster.key_path,
        known_hosts_path=known_hosts,
        trust_on_first_use=trust_on_first_use,
    )


def refuse_if_gone(cluster: Cluster, node: Node, probe: CloudProbe) -> None:
    """A sandbox node is reached only while the sandbox's cloud runs its instance, as a
    terminated EC2 instance cannot be reached: its directory outlives a termination
    done outside gpuflow, or a sandbox server that was stopped (its state lost).  A
    cloud that cannot say (an error) is no reason to refuse."""
    try:
        state = probe.instance_state(cluster, node.instance_id)
    except GpuflowError:
        return
    if state not in _ALIVE_STATES:
        raise InstanceGone.no_longer_running(
            f"{node.instance_id} of cluster {cluster.name!r}",
            state,
            hint=f"{command_hint(f'status {cluster.name}', cluster.sandbox)} shows what happened to it; "
            f"{command_hint(f'down {cluster.name}', cluster.sandbox)} forgets it and "
            f"{command_hint(f'up {cluster.name}', cluster.sandbox)} starts a new one",
        )


def instance_alive_hook(cluster: Cluster, instance_id: str, probe: CloudProbe | None = None) -> Callable[[], bool]:
    """Asks the cloud whether the instance still runs: tells a dropped connection
    (retry) from a stopped or terminated instance (give up at once)."""
    probe = probe or ProvisionerProbe()

    def alive() -> bool:
        return probe.instance_state(cluster, instance_id) in _ALIVE_STATES

    return alive


def node_alive(
    cluster: Cluster, node: Node | None = None, probe: CloudProbe | None = None, *, project_dir: Path | None = None
) -> bool:
    """Whether ``node`` (default: the head node) still runs, asked as it is reached:
    a sandbox node's disk is its directory, deleted when it is terminated (down,
    reap) -- asking the sandbox's EC2 could start a server the last `down` already
    stopped; a cloud instance's state is asked of the cloud."""
    node = node or cluster.head
    if access_for(cluster, project_dir=project_dir).reach is not Reach.SSH:
        return sandbox_directory(cluster, node).is_dir()
    return instance_alive_hook(cluster, node.instance_id, probe)()


def runner_for(
    cluster: Cluster,
    node: Node | None = None,
    *,
    trust_on_first_use: bool = False,
    probe: CloudProbe | None = None,
    project_dir: Path | None = None,
    **ssh_options: Any,
) -> CommandRunner:
    """The runner factory: a command runner for ``node`` (default: the head node).

    ``ssh_options`` go to :class:`~gpuflow.transport.ssh.SSHRunner`
    (``connect_timeout``, ``keepalive_interval``, ``backoff``, ``sleep``,
    ``instance_alive``, ``base_dir``).  ``probe`` answers what the cloud is
    asked (default: :class:`ProvisionerProbe`).  The runner connects on first use.
    Within :func:`gpuflow.transport.shared.shared_connections` (a command's scope)
    an SSH node's runner is made once per thread and handed out again: one
    connection per command and node.
    """
    node = node or cluster.head
    access = access_for(cluster, project_dir=project_dir)
    probe = probe or ProvisionerProbe()
    if access.reach is not Reach.SSH:  # a real instance is asked only when a connection fails
        refuse_if_gone(cluster, node, probe)
    if access.reach is Reach.DIRECTORY:
        return LocalRunner(sandbox_directory(cluster, node))
    target = _target(cluster, node, access, trust_on_first_use)
    if access.reach is Reach.LOOPBACK_SSH:
        assert access.sandbox_ssh is not None
        _pin_sandbox_host_key(target, access.sandbox_ssh)
        ssh_options.setdefault("base_dir", str(sandbox_directory(cluster, node)))
        expected: tuple[str, ...] = ()
    else:
        expected = ensure_host_keys(cluster, node, target, probe)

    def make() -> SSHRunner:
        return _ssh_runner(target, instance_alive_hook(cluster, node.instance_id, probe), expected, ssh_options)

    if ssh_options.keys() - {"base_dir"}:
        return make()
    # Within a command's scope (`gpuflow run`): one connection per node, shared by all it does.
    return shared.shared_runner((cluster.name, node.instance_id, trust_on_first_use), target, make)


def _ssh_runner(
    target: SSHTarget,
    alive: Callable[[], bool],
    expected_fingerprints: Sequence[str],
    options: dict[str, Any],
) -> SSHRunner:
    options.setdefault("instance_alive", alive)
    options.setdefault("keepalive_interval", SERVER_ALIVE_INTERVAL)
    return SSHRunner(target, expected_fingerprints=expected_fingerprints, **options)


def _pin_sandbox_host_key(target: SSHTarget, sandbox: SandboxSSH) -> None:
    """The configured loopback server's key is trusted configuration: pin it as given."""
    assert target.known_hosts_path is not None
    pinned = hostkeys.pinned_keys(target.known_hosts_path, target.host, target.port)
    if pinned != [sandbox.host_key]:
        hostkeys.pin_host_keys(target.known_hosts_path, target.host, target.port, [sandbox.host_key])


def ensure_host_keys(cluster: Cluster, node: Node, target: SSHTarget, probe: CloudProbe | None = None) -> tuple[str, ...]:
    """Make sure the node's host keys are pinned before anything connects.

    Returns () when keys are pinned (or trust-on-first-use was asked for), or
    the SHA256 fingerprints the console printed when it printed only those (the
    SSH transport then accepts exactly such a key and pins it).  The console is
    read through ``probe`` (default: :class:`ProvisionerProbe`).
    """
    assert target.known_hosts_path is not None
    if hostkeys.pinned_keys(target.known_hosts_path, target.host, target.port):
        return ()
    console = (probe or ProvisionerProbe()).console_output(cluster, node.instance_id) or ""
    found = hostkeys.parse_console_output(console)
    if found.keys:
        hostkeys.pin_host_keys(target.known_hosts_path, target.host, target.port, found.keys)
        return ()
    if found.fingerprints:
        return found.fingerprints
    if target.trust_on_first_use:
        return ()
    raise UnreachableHost(
        f"instance {node.instance_id} has not printed its SSH host keys on its console yet (still booting?)",
        hint="retry in a minute, or pass --trust-on-first-use to accept the key it presents unverified",
    )


# ---------------------------------------------------------------------- the system ssh


def openssh_options(target: SSHTarget) -> list[str]:
    """Options making the system ``ssh`` (and rsync/scp through it) use exactly
    the cluster's key and pinned host keys, and refuse anything else: the one
    builder's (:mod:`gpuflow.transport.openssh`), shared with sync and ssh-config."""
    return openssh.ssh_argv(target)[1:]


def openssh_argv(target: SSHTarget) -> list[str]:
    """``ssh OPTIONS`` without the destination: for ``rsync -e quote_argv(openssh_argv(t))``."""
    return openssh.ssh_argv(target)


@dataclass(frozen=True)
class OpenSSHNode:
    """A node as the system ``ssh`` reaches it: its target (host keys pinned), and
    its gpuflow directory when that is not the instance's ``~/gpuflow`` (a sandbox
    node behind the loopback sshd: its directory on this machine)."""

    target: SSHTarget
    base_dir: str | None = None


def openssh_node(
    cluster: Cluster,
    node: Node,
    *,
    trust_on_first_use: bool = False,
    probe: CloudProbe | None = None,
    project_dir: Path | None = None,
) -> OpenSSHNode | None:
    """Make ``node`` reachable by the system ``ssh`` (`gpuflow ssh`, `gpuflow
    forward`): a sandbox node must still run, the key's permissions must do, the
    host keys are pinned in the cluster's known_hosts (from the console, or by
    one paramiko connection when only fingerprints are known).  None for a
    sandbox node without a loopback sshd (its directory on this machine)."""
    access = access_for(cluster, project_dir=project_dir)
    probe = probe or ProvisionerProbe()
    if access.reach is not Reach.SSH:
        refuse_if_gone(cluster, node, probe)
    if access.reach is Reach.DIRECTORY:
        return None
    target = _target(cluster, node, access, trust_on_first_use)
    if target.key_path:
        check_key_permissions(target.key_path)  # OpenSSH would ignore the key: say how to fix it, before ssh runs
    if access.reach is Reach.LOOPBACK_SSH:
        assert access.sandbox_ssh is not None
        _pin_sandbox_host_key(target, access.sandbox_ssh)
        directory = sandbox_directory(cluster, node)
        directory.mkdir(parents=True, exist_ok=True)
        return OpenSSHNode(target, str(directory))
    expected = ensure_host_keys(cluster, node, target, probe)
    if not hostkeys.pinned_keys(str(target.known_hosts_path), target.host, target.port):
        # Only fingerprints on the console (or trust-on-first-use): one paramiko
        # connection verifies the presented key and pins it for OpenSSH.
        alive = instance_alive_hook(cluster, node.instance_id, probe)
        _ssh_runner(target, alive, expected, {}).check_host_key()
    return OpenSSHNode(target)


@dataclass(frozen=True)
class Invocation:
    """A process to exec for `gpuflow ssh`: argv, and the directory to run it in."""

    argv: tuple[str, ...]
    cwd: str | None = None


def ssh_invocation(
    cluster: Cluster,
    command: Sequence[str] | None = None,
    *,
    instance_id: str | None = None,
    trust_on_first_use: bool = False,
    probe: CloudProbe | None = None,
    project_dir: Path | None = None,
) -> Invocation:
    """What `gpuflow ssh NAME [-- CMD]` runs: the system ssh with the pinned
    known_hosts (each CMD argument quoted, so it arrives literally); for a
    sandbox cluster without a loopback sshd, bash in the sandbox directory."""
    node = select_node(cluster, instance_id)
    reached = openssh_node(cluster, node, trust_on_first_use=trust_on_first_use, probe=probe, project_dir=project_dir)
    if reached is None:
        directory = sandbox_directory(cluster, node)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "heartbeat").touch()  # like every connection to an instance
        argv = ["bash", "-c", quote_argv(command)] if command else ["bash", "-i"]
        return Invocation(tuple(argv), str(directory))
    sharing = openssh.sharing_options(str(gpuflow_home()), cluster.name, node_identity(cluster, node), reached.target)
    return Invocation(tuple(openssh.login_argv(reached.target, command, reached.base_dir, sharing)))


def node_identity(cluster: Cluster, node: Node) -> tuple[str, str]:
    """What names one incarnation of a node for a shared connection (with its address, user,
    key and pinned host keys, :func:`openssh.control_path`): the record's creation time and
    the instance id.  The `gpuflow ssh` fast path reads the same two fields of the record."""
    return (cluster.created_at or "", node.instance_id)
