"""Reaching a cluster's instance: targets, command runners, `gpuflow ssh`, `gpuflow ssh-config`.

"Which machine" (a :class:`Cluster`) becomes "how to reach it" here:

* :func:`ssh_target_for` — the :class:`SSHTarget` of a node (address, user,
  key, the cluster's pinned known_hosts ``$GPUFLOW_HOME/known_hosts/<cluster>``);
* :func:`runner_for` — a :class:`CommandRunner` for a node: an ``SSHRunner``
  with pinned host keys for a real instance; for a sandbox cluster a
  ``LocalRunner`` in ``$GPUFLOW_HOME/sandbox/<cluster>/<instance-id>``, or, when
  a loopback sshd is configured for the sandbox (``GPUFLOW_SANDBOX_SSH`` or the
  ``sandbox_ssh`` project setting), an ``SSHRunner`` to it using that directory
  as its base;
* :func:`openssh_argv` — the system ``ssh`` command line with the same pinning
  (used by ``gpuflow ssh`` and by rsync's ``-e``).

Host keys are pinned lazily: the first time a node is reached, its host keys
are read from the instance's console output (cloud-init prints them there at
first boot) and written to the cluster's known_hosts.

Nothing here imports paramiko or boto3 at module level; the cloud is asked
through :mod:`gpuflow.clusters` (imported inside the functions that need it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuflow.config import gpuflow_home, load_project_config
from gpuflow.errors import ConfigError, DamagedRecord, GpuflowError, UnreachableHost, UsageError
from gpuflow.records import Cluster, Node, SSHTarget
from gpuflow.state import StateStore, atomic_write_bytes, validate_name, warn_damaged
from gpuflow.transport import hostkeys, openssh
from gpuflow.transport.base import CommandRunner, quote_argv
from gpuflow.transport.openssh import SERVER_ALIVE_INTERVAL

if TYPE_CHECKING:
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


def discard_sandbox_instance(cluster_name: str, instance_id: str) -> None:
    """What EC2 termination does to a real instance, done to a sandbox one:
    every job and supervisor running "on" it is killed (their process groups,
    and on Linux every process carrying a run's marker, as a power-off would)
    and its "disk" — the sandbox directory — is deleted.  Only processes proven
    to be its runs' are signalled (:func:`gpuflow.procs.terminate_base`): a
    pid file naming a process that merely reused the pid kills nothing.  The
    sandbox provisioner calls this for every instance it terminates."""
    import shutil

    from gpuflow import procs

    directory = gpuflow_home() / "sandbox" / validate_name(cluster_name, "cluster name") / validate_name(
        instance_id, "instance id"
    )
    if not directory.is_dir():
        return
    procs.terminate_base(str(directory))
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()  # the cluster's directory, once its last node is gone


def ssh_config_path() -> Path:
    return gpuflow_home() / "ssh_config"


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
    environ: Mapping[str, str] | None = None, settings: Mapping[str, Any] | None = None
) -> SandboxSSH | None:
    """The configured loopback sshd for the sandbox, or None.

    ``GPUFLOW_SANDBOX_SSH="host=127.0.0.1,port=2222,user=me,key=/path/key,host_key=/path/host_key.pub"``
    or a ``[sandbox_ssh]`` table with the same keys in the project config.
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
            settings = load_project_config().settings
        table = settings.get("sandbox_ssh")
        if not table:
            return None
        if not isinstance(table, Mapping):
            raise ConfigError("the sandbox_ssh setting must be a table (host, port, user, key, host_key)")
        values = {str(key).replace("-", "_"): value for key, value in table.items()}
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


# ---------------------------------------------------------------------- clusters


def load_cluster(name: str) -> Cluster:
    """The cluster record named ``name`` (through :mod:`gpuflow.clusters`)."""
    try:
        from gpuflow.clusters import get_cluster
    except ImportError:  # the provisioning layer is not installed: read the state cache
        return _cached_cluster(name)
    return get_cluster(name)


def load_clusters() -> list[Cluster]:
    """Every cluster gpuflow knows locally, from the state cache (no cloud call:
    ``ssh-config`` must work offline and fast)."""
    from gpuflow.errors import ClusterNotFound

    clusters = []
    for name in StateStore(gpuflow_home(), "clusters").names():
        try:
            clusters.append(load_cluster(name))
        except ClusterNotFound:  # deleted, kept as a tombstone
            continue
        except DamagedRecord as exc:  # concerns its own name only
            warn_damaged(exc)
            continue
    return clusters


def _cached_cluster(name: str) -> Cluster:
    from gpuflow.errors import ClusterNotFound

    document = StateStore(gpuflow_home(), "clusters").get(validate_name(name, "cluster name"))
    if document is None:
        from gpuflow.clusters import command_hint, sandbox_in_effect

        raise ClusterNotFound(f"no cluster named {name!r}", hint=f"{command_hint('ls', sandbox_in_effect())} lists your clusters")
    return Cluster.from_dict(document)


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


def ssh_target_for(cluster: Cluster, node: Node | None = None, *, trust_on_first_use: bool = False) -> SSHTarget:
    """How to reach ``node`` (default: the head) over SSH.

    For a sandbox cluster this is the configured loopback sshd; a sandbox
    without one has no SSH target (:class:`UsageError`).
    """
    node = node or cluster.head
    known_hosts = str(known_hosts_path(cluster.name))
    if cluster.sandbox:
        sandbox = sandbox_ssh_settings()
        if sandbox is None:
            raise UsageError(
                f"sandbox cluster {cluster.name!r} runs on this machine, not over SSH",
                hint=f"set {ENV_SANDBOX_SSH} to reach it through a loopback sshd",
            )
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
        from gpuflow.clusters import command_hint

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


def instance_alive_hook(cluster: Cluster, instance_id: str) -> Callable[[], bool]:
    """Asks EC2 whether the instance still runs: tells a dropped connection
    (retry) from a stopped or terminated instance (give up at once)."""

    def alive() -> bool:
        try:
            from gpuflow.clusters import instance_state
        except ImportError:
            return True  # nobody to ask: keep retrying the connection
        return instance_state(cluster, instance_id) in _ALIVE_STATES

    return alive


def runner_for(
    cluster: Cluster,
    node: Node | None = None,
    *,
    trust_on_first_use: bool = False,
    **ssh_options: Any,
) -> CommandRunner:
    """A command runner for ``node`` (default: the head node).

    ``ssh_options`` go to :class:`~gpuflow.transport.ssh.SSHRunner`
    (``connect_timeout``, ``keepalive_interval``, ``backoff``, ``sleep``,
    ``instance_alive``, ``base_dir``).  The runner connects on first use.
    """
    node = node or cluster.head
    if cluster.sandbox:
        directory = sandbox_directory(cluster, node)
        sandbox = sandbox_ssh_settings()
        if sandbox is None:
            from gpuflow.transport.local import LocalRunner

            return LocalRunner(directory)
        target = ssh_target_for(cluster, node)
        _pin_sandbox_host_key(target, sandbox)
        ssh_options.setdefault("base_dir", str(directory))
        return _ssh_runner(target, instance_alive_hook(cluster, node.instance_id), (), ssh_options)
    target = ssh_target_for(cluster, node, trust_on_first_use=trust_on_first_use)
    expected = ensure_host_keys(cluster, node, target)
    return _ssh_runner(target, instance_alive_hook(cluster, node.instance_id), expected, ssh_options)


def _ssh_runner(
    target: SSHTarget,
    alive: Callable[[], bool],
    expected_fingerprints: Sequence[str],
    options: dict[str, Any],
) -> SSHRunner:
    from gpuflow.transport.ssh import SSHRunner

    options.setdefault("instance_alive", alive)
    options.setdefault("keepalive_interval", SERVER_ALIVE_INTERVAL)
    return SSHRunner(target, expected_fingerprints=expected_fingerprints, **options)


def _pin_sandbox_host_key(target: SSHTarget, sandbox: SandboxSSH) -> None:
    """The configured loopback server's key is trusted configuration: pin it as given."""
    assert target.known_hosts_path is not None
    pinned = hostkeys.pinned_keys(target.known_hosts_path, target.host, target.port)
    if pinned != [sandbox.host_key]:
        hostkeys.pin_host_keys(target.known_hosts_path, target.host, target.port, [sandbox.host_key])


def ensure_host_keys(cluster: Cluster, node: Node, target: SSHTarget) -> tuple[str, ...]:
    """Make sure the node's host keys are pinned before anything connects.

    Returns () when keys are pinned (or trust-on-first-use was asked for), or
    the SHA256 fingerprints the console printed when it printed only those (the
    SSH transport then accepts exactly such a key and pins it).
    """
    assert target.known_hosts_path is not None
    if hostkeys.pinned_keys(target.known_hosts_path, target.host, target.port):
        return ()
    console = _console_output(cluster, node)
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


def _console_output(cluster: Cluster, node: Node) -> str:
    try:
        from gpuflow.clusters import console_output
    except ImportError:
        return ""
    return console_output(cluster, node.instance_id) or ""


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
class Invocation:
    """A process to exec for `gpuflow ssh`: argv, and the directory to run it in."""

    argv: tuple[str, ...]
    cwd: str | None = None


def ssh_invocation(
    cluster_name: str,
    command: Sequence[str] | None = None,
    *,
    instance_id: str | None = None,
    trust_on_first_use: bool = False,
) -> Invocation:
    """What `gpuflow ssh NAME [-- CMD]` runs: the system ssh with the pinned
    known_hosts (each CMD argument quoted, so it arrives literally); for a
    sandbox cluster without a loopback sshd, bash in the sandbox directory."""
    cluster = load_cluster(cluster_name)
    node = select_node(cluster, instance_id)
    if cluster.sandbox and sandbox_ssh_settings() is None:
        directory = sandbox_directory(cluster, node)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "heartbeat").touch()  # like every connection to an instance
        argv = ["bash", "-c", quote_argv(command)] if command else ["bash", "-i"]
        return Invocation(tuple(argv), str(directory))
    remote_command = quote_argv(command) if command else 'exec "${SHELL:-/bin/sh}" -l'
    if cluster.sandbox:
        sandbox = sandbox_ssh_settings()
        assert sandbox is not None
        target = ssh_target_for(cluster, node)
        _pin_sandbox_host_key(target, sandbox)
        # The loopback "instance" is this machine: start where the sandbox instance's files are.
        directory = sandbox_directory(cluster, node)
        directory.mkdir(parents=True, exist_ok=True)
        remote_command = _touch_heartbeat(str(directory)) + f"cd {quote_argv([str(directory)])} && " + remote_command
    else:
        target = ssh_target_for(cluster, node, trust_on_first_use=trust_on_first_use)
        expected = ensure_host_keys(cluster, node, target)
        if not hostkeys.pinned_keys(str(target.known_hosts_path), target.host, target.port):
            # Only fingerprints on the console (or trust-on-first-use): one paramiko
            # connection verifies the presented key and pins it for OpenSSH.
            alive = instance_alive_hook(cluster, node.instance_id)
            _ssh_runner(target, alive, expected, {}).check_host_key()
        remote_command = _touch_heartbeat(None) + remote_command
    argv = [*openssh_argv(target), "-o", "LogLevel=ERROR"]
    if not command:
        argv.append("-t")  # an interactive shell behind a command needs a terminal asked for
    argv += ["--", f"{target.user}@{target.host}"]
    argv.append(remote_command)  # one pre-quoted string: the remote shell splits it back exactly
    return Invocation(tuple(argv))


def _touch_heartbeat(base_dir: str | None) -> str:
    """A prefix for a remote command that touches the dead-man's switch's
    heartbeat in ``base_dir`` (None: the instance's ``~/gpuflow``), as every
    gpuflow connection does; it never fails the command, and it is one quoted
    ``sh -c`` so any login shell runs it."""
    script = 'base="${1:-$HOME/gpuflow}"; mkdir -p "$base" && touch "$base/heartbeat"'
    return quote_argv(["sh", "-c", script, "sh", *([base_dir] if base_dir else [])]) + " 2>/dev/null; "


# ---------------------------------------------------------------------- ssh-config


@dataclass(frozen=True)
class SshConfigReport:
    path: Path
    hosts: tuple[str, ...]  # Host aliases written
    skipped: tuple[str, ...]  # one line per cluster left out, and why
    include_line: str


def _config_value(value: str) -> str:
    """A path as ssh_config reads it: '%' is a token escape, spaces need quotes."""
    return openssh.option_value(value)


# Joins a cluster name and a node index in ssh-config aliases ("a+1" is node 1 of
# "a"): cluster names cannot hold it (validate_name), so no alias of one cluster
# can be another cluster's name or alias.
NODE_ALIAS_SEPARATOR = "+"


def node_alias(cluster_name: str, index: int) -> str:
    """The ssh-config Host alias of node ``index`` (0 is the head: the bare name)."""
    return cluster_name if index == 0 else f"{cluster_name}{NODE_ALIAS_SEPARATOR}{index}"


def ssh_config_text(clusters: Sequence[Cluster]) -> tuple[str, list[str], list[str]]:
    """The include file's text, the Host aliases in it, and what was left out."""
    lines = [
        "# Written by `gpuflow ssh-config`: one Host per cluster node, with the cluster's",
        "# pinned host keys. Regenerated on every run; do not edit.",
        "",
    ]
    hosts: list[str] = []
    skipped: list[str] = []
    for cluster in sorted(clusters, key=lambda record: record.name):
        if cluster.sandbox and sandbox_ssh_settings() is None:
            skipped.append(f"{cluster.name}: sandbox cluster, runs on this machine (no SSH)")
            continue
        for index, node in enumerate(cluster.nodes):
            alias = node_alias(cluster.name, index)
            try:
                target = ssh_target_for(cluster, node)
            except GpuflowError as exc:
                skipped.append(f"{alias}: {exc.one_line()}")
                continue
            lines += [f"Host {alias}", f"    HostName {target.host}", *openssh.config_lines(target), ""]
            hosts.append(alias)
    return "\n".join(lines), hosts, skipped


def write_ssh_config(clusters: Sequence[Cluster] | None = None, path: Path | None = None) -> SshConfigReport:
    """Write the include file (atomically) with a Host entry per cluster node."""
    path = path or ssh_config_path()
    clusters = load_clusters() if clusters is None else list(clusters)
    text, hosts, skipped = ssh_config_text(clusters)
    atomic_write_bytes(path, text.encode(), mode=0o600)
    return SshConfigReport(path, tuple(hosts), tuple(skipped), f"Include {_config_value(str(path))}")


def install_ssh_include(include_line: str, user_config: Path | None = None) -> bool:
    """Put ``include_line`` at the top of ~/.ssh/config (an Include after a
    Host block would only apply inside that block).  Idempotent: returns False
    when it is already there."""
    user_config = user_config or Path.home() / ".ssh" / "config"
    try:
        existing = user_config.read_text()
    except FileNotFoundError:
        existing = ""
    if any(line.strip() == include_line for line in existing.splitlines()):
        return False
    user_config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = user_config.stat().st_mode & 0o777 if user_config.exists() else 0o600
    header = f"# Added by `gpuflow ssh-config --install`: reach gpuflow clusters by name.\n{include_line}\n\n"
    atomic_write_bytes(user_config, (header + existing).encode(), mode=mode)
    return True
