"""The one builder of OpenSSH client options: every ``ssh`` gpuflow starts and every ssh_config Host block it writes.

Three users, one set of settings, so they cannot drift apart again:

* ``gpuflow sync`` (its listing session, and rsync's ``-e``),
* ``gpuflow ssh`` (the system ``ssh`` it execs: :func:`login_argv`, for the full command and its
  fast path alike; this module imports no more than ``gpuflow.errors``, ``shlex``, ``os`` and
  ``hashlib`` for that),
* ``gpuflow ssh-config`` (the Host blocks plain ssh, scp, rsync and editors read).

`gpuflow ssh` also shares one authenticated connection per node across commands
(:func:`sharing_options`: OpenSSH's ``ControlMaster=auto`` with ``ControlPersist``),
on a socket whose name hashes the node's whole identity; :func:`close_masters`
ends a cluster's shared connections when it is torn down.

Each of them reaches a node with exactly the cluster's key (``IdentitiesOnly``)
and its pinned host keys (its own ``UserKnownHostsFile``, no global file,
``StrictHostKeyChecking yes``: OpenSSH never trusts a key on first use; when a
user asks for that, gpuflow's paramiko runner verifies and pins the key first).
The processes gpuflow itself starts also ignore ``~/.ssh/config`` (``-F none``:
a ``RemoteCommand``, ``RequestTTY`` or ``ControlMaster`` there would break
sync's protocol) and never prompt (``BatchMode``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpuflow.errors import SecurityError, UsageError
from gpuflow.transport.quoting import quote_argv

if TYPE_CHECKING:  # only its attributes are read: the `gpuflow ssh` fast path passes its own (no dataclasses imported)
    from gpuflow.records import SSHTarget

# One value for every way gpuflow reaches a node (OpenSSH here, paramiko in
# transport/ssh.py): an unreachable host is given up on after the same time
# whatever the command.  15 s, not the 20 sync once used: a running instance
# answers the TCP handshake in well under a second even across continents, and
# SSHRunner retries a failed connection with backoff anyway, so a longer first
# wait only delays the one-line error.
CONNECT_TIMEOUT_SECONDS = 15
SERVER_ALIVE_INTERVAL = 15  # seconds between keepalives, for paramiko and for OpenSSH alike
SERVER_ALIVE_COUNT = 4  # missed keepalives before OpenSSH gives up (about a minute)


def option_value(value: str) -> str:
    """A value as OpenSSH reads it in ``-o Key=value`` and in ssh_config alike:
    ``%`` is a token escape, and whitespace needs double quotes (which therefore
    cannot appear inside; nor can a line break, which would end the line)."""
    if '"' in value or "\n" in value or "\r" in value:
        raise UsageError(f"unsupported character in {value!r} for an OpenSSH option")
    value = value.replace("%", "%%")
    return f'"{value}"' if any(character.isspace() for character in value) else value


def host_options(target: SSHTarget) -> list[tuple[str, str]]:
    """The settings that reach ``target`` with its key and pinned host keys, as
    (keyword, value) pairs: :func:`ssh_argv` and :func:`config_lines` render them."""
    if not target.known_hosts_path:
        raise SecurityError(
            f"no pinned host key for {target.host}:{target.port}",
            hint="the cluster's known_hosts file is missing; run `gpuflow ssh NAME` to pin the instance's key",
        )
    options = [("User", option_value(target.user)), ("Port", str(int(target.port)))]
    if target.key_path:
        options += [("IdentityFile", option_value(str(target.key_path))), ("IdentitiesOnly", "yes")]
    options += [
        ("UserKnownHostsFile", option_value(str(target.known_hosts_path))),
        ("GlobalKnownHostsFile", "/dev/null"),
        ("StrictHostKeyChecking", "yes"),
        ("CheckHostIP", "no"),
        ("ServerAliveInterval", str(SERVER_ALIVE_INTERVAL)),
        ("ServerAliveCountMax", str(SERVER_ALIVE_COUNT)),
        ("ConnectTimeout", str(CONNECT_TIMEOUT_SECONDS)),
    ]
    return options


# Only for the processes gpuflow starts (not in ssh-config: a person's own ssh may prompt).
_PROCESS_OPTIONS = (("BatchMode", "yes"), ("LogLevel", "ERROR"))


def ssh_argv(target: SSHTarget, *, control_path: str | None = None) -> list[str]:
    """``ssh`` and its options, without the destination (``host`` or
    ``user@host``) and the command; ``control_path`` names the socket of a
    multiplexed connection (sync's)."""
    argv = ["ssh", "-F", "none"]
    for keyword, value in (*host_options(target), *_PROCESS_OPTIONS):
        argv += ["-o", f"{keyword}={value}"]
    if control_path:
        argv += ["-o", f"ControlPath={option_value(control_path)}"]
    return argv


def config_lines(target: SSHTarget, indent: str = "    ") -> list[str]:
    """The same settings as lines of an ssh_config ``Host`` block (after its ``HostName``)."""
    return [f"{indent}{keyword} {value}" for keyword, value in host_options(target)]


def login_argv(
    target: SSHTarget, command: Sequence[str] | None, base_dir: str | None = None, sharing: Sequence[str] = ()
) -> list[str]:
    """What `gpuflow ssh` execs to reach ``target``: ``ssh`` with :func:`ssh_argv`'s
    options and the remote command (each of ``command``'s arguments quoted, so it
    arrives literally; none: a login shell, with a terminal asked for), after a
    touch of the node's heartbeat; ``base_dir``: the node's gpuflow directory when it
    is not the instance's ``~/gpuflow`` (a sandbox node behind the loopback sshd),
    where the command then starts; ``sharing``: :func:`sharing_options` for the node."""
    remote_command = quote_argv(command) if command else 'exec "${SHELL:-/bin/sh}" -l'
    if base_dir is not None:
        # The loopback "instance" is this machine: start where the sandbox instance's files are.
        remote_command = f"cd {quote_argv([base_dir])} && " + remote_command
    remote_command = _touch_heartbeat(base_dir) + remote_command
    argv = [*ssh_argv(target), *sharing, "-o", "LogLevel=ERROR"]
    if not command:
        argv.append("-t")  # an interactive shell behind a command needs a terminal asked for
    argv += ["--", f"{target.user}@{target.host}"]
    argv.append(remote_command)  # one pre-quoted string: the remote shell splits it back exactly
    return argv


def _touch_heartbeat(base_dir: str | None) -> str:
    """A prefix for a remote command that touches the dead-man's switch's
    heartbeat in ``base_dir`` (None: the instance's ``~/gpuflow``), as every
    gpuflow connection does; it never fails the command, and it is one quoted
    ``sh -c`` so any login shell runs it."""
    script = 'base="${1:-$HOME/gpuflow}"; mkdir -p "$base" && touch "$base/heartbeat"'
    return quote_argv(["sh", "-c", script, "sh", *([base_dir] if base_dir else [])]) + " 2>/dev/null; "


# ---------------------------------------------------------------------- one connection shared across commands

ENV_PERSIST = "GPUFLOW_SSH_PERSIST"
DEFAULT_PERSIST_SECONDS = 120
MAX_PERSIST_SECONDS = 3600
CONTROL_DIRECTORY = "cm"  # under $GPUFLOW_HOME: the shared connections' sockets
# A unix socket's path is at most 103 bytes on macOS (104 with its NUL; 107 on Linux), and a
# master first binds "<ControlPath>.<16 random characters>", then links it to its name.
_MAX_CONTROL_PATH = 103 - 17
_HOME_HASH, _CLUSTER_HASH, _NODE_HASH = 6, 6, 10  # hex digits of the socket's name, in that order


def persist_seconds(environ: dict[str, str] | None = None) -> int:
    """How long a shared connection outlives its last command (``$GPUFLOW_SSH_PERSIST``,
    whole seconds, 0: no sharing); a value that is not one is the user's to fix."""
    raw = (os.environ if environ is None else environ).get(ENV_PERSIST, "").strip()
    if not raw:
        return DEFAULT_PERSIST_SECONDS
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_PERSIST_SECONDS:
        raise UsageError(
            f"{ENV_PERSIST} must be a whole number of seconds from 0 to {MAX_PERSIST_SECONDS}, not {raw!r}",
            hint=f"unset it for the default ({DEFAULT_PERSIST_SECONDS}), or set it to 0 to share no connections",
        )
    return int(raw)


def control_directories(home: str) -> tuple[str, str]:
    """Where shared connections' sockets live: ``$GPUFLOW_HOME/cm``, and the per-user
    directory under the temporary directory used when that path is too long for a socket."""
    temporary = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(os.path.abspath(home), CONTROL_DIRECTORY), os.path.join(temporary, f"gpuflow-cm-{os.getuid()}")


def _private(directory: str, *, create: bool) -> bool:
    """Whether ``directory`` is a plain directory of this user that nobody else may enter
    (made with mode 0700 when ``create``); a socket is never put anywhere else."""
    if create:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return (info.st_mode & 0o170000) == 0o040000 and info.st_uid == os.getuid() and not info.st_mode & 0o077


def _digest(*parts: str | bytes) -> str:
    import hashlib

    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "big") + data)  # length-prefixed: no two tuples hash alike
    return hasher.hexdigest()


def _cluster_prefix(home: str, cluster: str | None) -> str:
    home = os.path.abspath(home)
    prefix = _digest("home", home)[:_HOME_HASH]
    return prefix if cluster is None else prefix + _digest("cluster", home, cluster)[:_CLUSTER_HASH]


def control_path(home: str, cluster: str, identity: Sequence[str], target: SSHTarget) -> str | None:
    """The socket of the connection shared by commands to one node, or None (no sharing this
    time: no private directory, a path too long, pinned keys unreadable).

    Its name hashes this gpuflow home (whose owner id the cluster carries), the cluster's name,
    ``identity`` (the record's creation time and the node's instance id) and everything that
    reaches the node: host, port, user, key file and the pinned host keys' contents.  A
    re-created cluster, a replaced instance, a recycled address or a re-pinned key therefore
    never reuses an older connection (OpenSSH's own ``%C`` hashes only host, port and user)."""
    try:
        with open(str(target.known_hosts_path), "rb") as file:
            pinned = file.read()
    except OSError:
        return None
    node = _digest(
        "node", *identity, target.host, str(int(target.port)), target.user, str(target.key_path or ""), pinned
    )
    name = _cluster_prefix(home, cluster) + node[:_NODE_HASH]
    for directory in control_directories(home):
        path = os.path.join(directory, name)
        if len(path.encode("utf-8", "surrogateescape")) <= _MAX_CONTROL_PATH:
            return path if _private(directory, create=True) else None
    return None


def sharing_options(home: str, cluster: str, identity: Sequence[str], target: SSHTarget) -> list[str]:
    """The options that make ``ssh`` share one connection to the node with later commands:
    the first becomes the master (with the same pinned keys and keepalives as any connection)
    and stays ``persist_seconds()`` after its last command; a later one rides it, with no
    handshake.  [] when sharing is off or not possible this time (the command then connects
    on its own, as without sharing); a stale socket (its master gone) OpenSSH removes and
    replaces itself."""
    seconds = persist_seconds()
    if seconds == 0:
        return []
    path = control_path(home, cluster, identity, target)
    if path is None:
        return []
    try:
        value = option_value(path)
    except UsageError:
        return []
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={value}", "-o", f"ControlPersist={seconds}"]


def master_sockets(home: str, cluster: str | None = None) -> list[str]:
    """The sockets of this home's shared connections (of ``cluster`` only, when given)."""
    prefix = _cluster_prefix(home, cluster)
    found = []
    for directory in control_directories(home):
        if not _private(directory, create=False):
            continue
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        wanted = _HOME_HASH + _CLUSTER_HASH + _NODE_HASH
        found += [os.path.join(directory, name) for name in sorted(names)
                  if name.startswith(prefix) and len(name) == wanted]
    return found


def close_masters(home: str, cluster: str | None = None) -> list[str]:
    """End the shared connections of ``cluster`` (every cluster of this home: None) and
    remove their sockets, for a teardown: ``ssh -O exit`` asks each master to close its
    connection (and whatever session still rides it); returns the sockets handled."""
    import subprocess

    closed = []
    for path in master_sockets(home, cluster):
        try:
            subprocess.run(
                ["ssh", "-F", "none", "-o", f"ControlPath={option_value(path)}", "-O", "exit", "gpuflow-master"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False,
            )
        except (OSError, subprocess.SubprocessError, UsageError):
            pass  # no ssh, or a master that does not answer: removing its socket is all that is left
        for leftover in (path, path + ".lock"):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        closed.append(path)
    return closed


def open_shared(argv: Sequence[str]) -> list[str] | int:
    """Call before exec'ing ``argv`` (a :func:`login_argv` with :func:`sharing_options`): when no
    shared connection to the node is open yet, open it first (``ssh -N -f`` with the very same
    options), holding a lock beside its socket, so that commands started together make one
    connection and ride it (with ``ControlMaster=auto`` alone each would race to be the master,
    and the losers would print OpenSSH's "ControlSocket ... already exists" on their stderr).

    Returns the argv to exec: ``argv`` (riding the connection; or, when this could not be
    arranged, connecting on its own as ``ControlMaster=auto`` does), or ``argv`` without its
    sharing options when the socket cannot be made (a file system without unix sockets):
    sharing never fails a command.  A number instead: the connection itself failed, ssh's
    message is on stderr, and the command would only fail the same way again: exit with it."""
    argv = list(argv)
    path = _shared_path(argv)
    if path is None or os.path.exists(path):
        return argv
    import fcntl
    import subprocess

    cut = argv.index("--")
    master = [("ControlMaster=yes" if word == "ControlMaster=auto" else word) for word in argv[:cut] if word != "-t"]
    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return argv
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held at most for one connection attempt (ConnectTimeout)
        if os.path.exists(path):
            return argv  # another command opened it meanwhile
        # A file, not a pipe, for ssh's messages: a backgrounded master can never hold us up.
        errors = os.open(path + ".err", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.unlink(path + ".err")
            done = subprocess.run([*master, "-N", "-f", "--", argv[cut + 1]], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=errors, check=False)
            os.lseek(errors, 0, os.SEEK_SET)
            said = os.read(errors, 1 << 16)
        finally:
            os.close(errors)
    except OSError:
        return argv  # no ssh: exec says so
    finally:
        os.close(lock)
    if done.returncode != 0 and (b"ControlSocket" in said or b"unix_listener" in said or b"ControlPath" in said):
        return unshared(argv)  # the socket could not be made here: connect on its own, say nothing
    if said:
        os.write(2, said)  # an unreachable host, a changed host key, a warning: as ssh printed it
    return argv if done.returncode == 0 else done.returncode


def unshared(argv: Sequence[str]) -> list[str]:
    """``argv`` without :func:`sharing_options`' options."""
    kept: list[str] = []
    words = list(argv)
    index = 0
    while index < len(words):
        if (words[index] == "-o" and index + 1 < len(words)
                and words[index + 1].startswith(("ControlMaster=", "ControlPath=", "ControlPersist="))):
            index += 2
            continue
        kept.append(words[index])
        index += 1
    return kept


def _shared_path(argv: Sequence[str]) -> str | None:
    """The socket named by ``argv``'s ControlPath (as :func:`sharing_options` wrote it), when it
    asks for a shared connection and has a destination after ``--``; else None."""
    if "ControlMaster=auto" not in argv or "--" not in argv or list(argv).index("--") + 1 >= len(argv):
        return None
    value = next((word[len("ControlPath="):] for word in argv if word.startswith("ControlPath=")), None)
    if not value:
        return None
    if value.startswith('"') and value.endswith('"'):
        value = value[1:-1]
    return value.replace("%%", "%")
