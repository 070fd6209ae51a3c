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


def _sha256():  # type: ignore[no-untyped-def]
    """A SHA-256 hasher from CPython's own module when there is one: `hashlib` loads OpenSSL
    (~4 ms, paid by every `gpuflow ssh`); the digest is the same."""
    try:
        from _sha2 import sha256  # CPython 3.12+
    except ImportError:
        try:
            from _sha256 import sha256  # CPython 3.11
        except ImportError:
            from hashlib import sha256
    return sha256()


def _digest(*parts: str | bytes) -> str:
    hasher = _sha256()
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


def open_shared(argv: Sequence[str]) -> list[str]:
    """Call before exec'ing ``argv`` (a :func:`login_argv` with :func:`sharing_options`): the
    argv to exec instead.

    With a shared connection to the node open, ``argv`` as it is: it rides that connection.
    Without one, this command becomes the connection's master: under a lock beside the socket
    it returns ``argv`` with ``ControlMaster=yes``, so that the one ``ssh`` it execs
    authenticates, listens on the socket, moves the connection into the background
    (``ControlPersist``) and runs the command as its first session, with no second ``ssh``
    started; the lock is handed to a forked watcher that holds it until the socket listens
    (or that ``ssh`` has ended), so commands started together make one connection and ride
    it (with ``ControlMaster=auto`` alone each would race to be the master, and the losers
    would print OpenSSH's "ControlSocket ... already exists" on their stderr).  A connection
    that fails says why once, as ssh prints it.  ``argv`` without its sharing options when a
    socket cannot be made there (a path too long, a file system without unix sockets):
    sharing never fails a command, and says nothing."""
    argv = list(argv)
    path = _shared_path(argv)
    if path is None or os.path.exists(path):
        return argv
    if not _can_listen(path):
        return unshared(argv)  # ssh could not make the socket: connect on its own, say nothing
    import fcntl

    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)  # not inherited by exec
    except OSError:
        return argv
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held at most for one connection attempt (see _hold_until_listening)
        if os.path.exists(path):
            return argv  # another command opened it meanwhile
        _hold_until_listening(lock, path)
    except OSError:
        return argv  # no fork: ControlMaster=auto connects on its own
    finally:
        os.close(lock)
    return [("ControlMaster=yes" if word == "ControlMaster=auto" else word) for word in argv]


# How long the watcher holds the lock for a master that is still connecting: its connect timeout,
# authentication, and a margin; past it the next command connects on its own (never a hang).
_MASTER_LISTEN_SECONDS = 2 * CONNECT_TIMEOUT_SECONDS + 15


def _hold_until_listening(lock: int, path: str) -> None:
    """Fork a watcher that keeps ``lock`` (a flock'ed file) until ``path`` exists (the master
    listens), the process that forked it (the ``ssh`` it execs next) has ended, or
    :data:`_MASTER_LISTEN_SECONDS` have passed; then it exits.  It holds no terminal or
    pipe of the command (its standard streams are /dev/null) and ignores Ctrl-C, so a
    reader of the command's output sees its end when ``ssh`` ends (it closes every other
    file descriptor too)."""
    import time

    parent = os.getpid()
    if os.fork() != 0:
        return
    try:  # the watcher: never returns
        import fcntl
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        held = fcntl.fcntl(lock, fcntl.F_DUPFD, 3)  # the same lock, clear of the standard streams
        null = os.open(os.devnull, os.O_RDWR)
        for stream in (0, 1, 2):
            os.dup2(null, stream)
        os.closerange(3, held)  # nothing else of the command's (a pipe, a socket) is kept open
        os.closerange(held + 1, 1 << 16)
        deadline = time.monotonic() + _MASTER_LISTEN_SECONDS
        while os.getppid() == parent and not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os._exit(0)


def _can_listen(path: str) -> bool:
    """Whether a unix socket can listen beside ``path``, as OpenSSH's master makes it (it binds
    ``path`` plus a dot and 16 random characters, then links that to ``path``): a probe of
    the same length, bound and removed at once."""
    import _socket  # the C module: `socket` costs milliseconds on this path

    probe = f"{path}.{os.getpid():016x}"
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        sock.bind(probe)
    except OSError:
        return False
    finally:
        sock.close()
    try:
        os.unlink(probe)
    except OSError:
        pass
    return True


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
