"""`gpuflow ssh NAME [--node ID] [-- CMD...]` without the CLI machinery, for its common case.

``gpuflow ssh NAME -- true`` should cost little more than ``ssh host true``:
the full CLI imports typer and every command module, and reading a cluster
through the cluster use cases or :mod:`gpuflow.nodes` imports the configuration
reader, the provisioner and the transports (~0.15 s).  This path imports
``json``, ``os`` and the one OpenSSH builder (:mod:`gpuflow.transport.openssh`,
which needs only ``shlex`` and :mod:`gpuflow.errors`), and nothing else of
gpuflow's.  When the command line is exactly ``ssh NAME``, ``ssh NAME -- CMD...``
(``--node ID`` may come before the ``--``) and NAME is a live cloud cluster (not
the sandbox) whose node has an address, a key file OpenSSH accepts and host keys
already pinned, it reads the record and execs the very command line
:func:`gpuflow.nodes.ssh_invocation` builds (:func:`openssh.login_argv`, with the
same shared connection: :func:`openssh.sharing_options` of the same record fields), as
the full command would: no Python process stays behind.  In every other case (another
option, a sandbox cluster, no pinned key yet, an unknown, unfinished or damaged
record, a key group or others can read, an unknown node) it returns and the full
CLI runs, with its checks, the console's host keys and its one-line errors.
Being conservative is the rule here: anything this module does not recognise
goes to the full command.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from gpuflow.home import home_path
from gpuflow.transport import openssh

_NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
# The key types gpuflow pins (gpuflow.transport.hostkeys.HOST_KEY_TYPES; a test keeps them equal).
PINNED_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")


class _Target:
    """The attributes of :class:`gpuflow.records.SSHTarget` that openssh reads (no dataclasses import)."""

    __slots__ = ("host", "port", "user", "key_path", "known_hosts_path")

    def __init__(self, host: str, port: int, user: str, key_path: str | None, known_hosts_path: str) -> None:
        self.host, self.port, self.user, self.key_path, self.known_hosts_path = host, port, user, key_path, known_hosts_path


def exec_if_simple(argv: Sequence[str]) -> None:
    """Exec ``ssh`` for ``argv`` (the arguments after ``gpuflow``) when it is the
    simple case; return otherwise."""
    try:
        login = fast_argv(argv)
    except Exception:  # noqa: BLE001 - the full CLI repeats the work and reports it properly
        return
    if login is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        login = openssh.open_shared(login)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    try:
        os.execvp(login[0], login)
    except OSError:
        return  # no ssh: the full CLI says so


def fast_argv(argv: Sequence[str]) -> list[str] | None:
    """The argv to exec for ``argv`` (``ssh NAME ...``), or None when the full command must run."""
    parsed = _parse(list(argv))
    if parsed is None:
        return None
    name, node_id, command = parsed
    if not _plain_name(name) or (node_id is not None and not _plain_name(node_id)):
        return None
    home = home_path()
    try:
        with open(os.path.join(home, "state", "clusters", f"{name}.json"), "rb") as file:
            document = json.loads(file.read())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("name") != name or document.get("phase", "up") != "up":
        return None
    if document.get("sandbox", False) is not False:
        return None  # the sandbox's instances are reached through its cloud: the full command
    if not all(isinstance(document.get(key), str) for key in ("region", "instance_type", "ami")):
        return None  # not a whole record: the full command says it is damaged
    node = _node(document.get("nodes"), node_id)
    user, port, key_path = document.get("ssh_user", "ubuntu"), document.get("ssh_port", 22), document.get("key_path")
    if (node is None or not isinstance(user, str) or type(port) is not int
            or not (key_path is None or isinstance(key_path, str))):
        return None
    address = node.get("public_ip") or node.get("private_ip")
    if not isinstance(address, str) or not address:
        return None  # no address yet: the full command says so
    if key_path and not _key_accepted(key_path):
        return None  # the full command says how to fix its mode
    known_hosts = os.path.join(home, "known_hosts", name)
    if not _pinned(known_hosts, address, port):
        return None  # the keys come from the console: the full command asks the cloud
    target = _Target(address, port, user, key_path, known_hosts)
    created_at, instance_id = document.get("created_at"), node.get("instance_id")
    if not (created_at is None or isinstance(created_at, str)) or not isinstance(instance_id, str):
        return None
    # gpuflow.nodes.node_identity's fields, read from the same record: the full command's socket.
    sharing = openssh.sharing_options(home, name, (created_at or "", instance_id), target)  # type: ignore[arg-type]
    return openssh.login_argv(target, command or None, None, sharing)  # type: ignore[arg-type]


def _parse(argv: list[str]) -> tuple[str, str | None, list[str]] | None:
    """(NAME, --node's value, CMD) for ``ssh NAME [--node ID] [-- CMD...]`` (the option on
    either side of NAME); None for any other shape (the full CLI's grammar decides)."""
    if argv[:1] != ["ssh"]:
        return None
    head, command = argv[1:], []
    if "--" in head:
        cut = head.index("--")
        head, command = head[:cut], head[cut + 1:]
        if not command:
            return None  # `--` with nothing after it: the full CLI says what it means
    name = node_id = None
    index = 0
    while index < len(head):
        word = head[index]
        if word == "--node" and node_id is None and index + 1 < len(head):
            node_id, index = head[index + 1], index + 2
        elif word.startswith("--node=") and node_id is None:
            node_id, index = word[len("--node="):], index + 1
        elif not word.startswith("-") and name is None:
            name, index = word, index + 1
        else:
            return None
    return None if name is None else (name, node_id, command)


def _plain_name(name: str) -> bool:
    """What gpuflow's name rule accepts (a subset of it is enough: the rest goes to the full command)."""
    return 0 < len(name) <= 63 and name[0].isalnum() and set(name) <= _NAME_CHARACTERS


def _node(nodes: object, node_id: str | None) -> dict | None:
    if not isinstance(nodes, list) or not nodes or not all(isinstance(node, dict) for node in nodes):
        return None
    if node_id is None:
        return nodes[0]  # the head
    return next((node for node in nodes if node.get("instance_id") == node_id), None)


def _key_accepted(key_path: str) -> bool:
    """False for a key file of this user that group or others can access (OpenSSH ignores it)."""
    try:
        status = os.stat(os.path.expanduser(key_path))
    except OSError:
        return True  # left to ssh, as the full command does
    return not (status.st_uid == os.getuid() and status.st_mode & 0o077)


def _pinned(known_hosts: str, host: str, port: int) -> bool:
    """Whether ``known_hosts`` has a key of a type gpuflow pins for ``host``:``port``
    (:func:`gpuflow.transport.hostkeys.pinned_keys` checks the blob too; a key it would
    reject makes ssh refuse the host, never accept another)."""
    wanted = host if port == 22 else f"[{host}]:{port}"
    try:
        with open(known_hosts, encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if (len(fields) >= 3 and not fields[0].startswith(("#", "@", "|")) and wanted in fields[0].split(",")
                and fields[1] in PINNED_KEY_TYPES):
            return True
    return False
