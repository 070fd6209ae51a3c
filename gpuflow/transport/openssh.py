"""The one builder of OpenSSH client options: every ``ssh`` gpuflow starts and every ssh_config Host block it writes.

Three users, one set of settings, so they cannot drift apart again:

* ``gpuflow sync`` (its listing session, and rsync's ``-e``),
* ``gpuflow ssh`` (the system ``ssh`` it execs: :func:`login_argv`, for the full command and its
  fast path alike; this module imports no more than ``gpuflow.errors`` and ``shlex`` for that),
* ``gpuflow ssh-config`` (the Host blocks plain ssh, scp, rsync and editors read).

Each of them reaches a node with exactly the cluster's key (``IdentitiesOnly``)
and its pinned host keys (its own ``UserKnownHostsFile``, no global file,
``StrictHostKeyChecking yes``: OpenSSH never trusts a key on first use; when a
user asks for that, gpuflow's paramiko runner verifies and pins the key first).
The processes gpuflow itself starts also ignore ``~/.ssh/config`` (``-F none``:
a ``RemoteCommand``, ``RequestTTY`` or ``ControlMaster`` there would break
sync's protocol) and never prompt (``BatchMode``).
"""

from __future__ import annotations

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


def login_argv(target: SSHTarget, command: Sequence[str] | None, base_dir: str | None = None) -> list[str]:
    """What `gpuflow ssh` execs to reach ``target``: ``ssh`` with :func:`ssh_argv`'s
    options and the remote command (each of ``command``'s arguments quoted, so it
    arrives literally; none: a login shell, with a terminal asked for), after a
    touch of the node's heartbeat; ``base_dir``: the node's gpuflow directory when it
    is not the instance's ``~/gpuflow`` (a sandbox node behind the loopback sshd),
    where the command then starts."""
    remote_command = quote_argv(command) if command else 'exec "${SHELL:-/bin/sh}" -l'
    if base_dir is not None:
        # The loopback "instance" is this machine: start where the sandbox instance's files are.
        remote_command = f"cd {quote_argv([base_dir])} && " + remote_command
    remote_command = _touch_heartbeat(base_dir) + remote_command
    argv = [*ssh_argv(target), "-o", "LogLevel=ERROR"]
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
