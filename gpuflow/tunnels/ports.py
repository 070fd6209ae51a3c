"""Port specs (``REMOTE[:LOCAL]``) and the local port a forward listens on (127.0.0.1 only)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gpuflow.errors import UsageError

LOOPBACK = "127.0.0.1"
PORT_TRIES = 100  # a taken local port: the next free one among this many


@dataclass(frozen=True)
class PortSpec:
    """One forward asked for: the node's ``remote`` port, and the local one wanted (None: the same number)."""

    remote: int
    local: int | None = None

    @property
    def wanted(self) -> int:
        return self.remote if self.local is None else self.local


@dataclass(frozen=True)
class Forward:
    """One forward set up: 127.0.0.1:``local`` here reaches 127.0.0.1:``remote`` on the node."""

    remote: int
    local: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.local}/"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(
            f"bad port spec {spec!r}: {text!r} is not a port number (1-65535)",
            hint="write REMOTE_PORT or REMOTE_PORT:LOCAL_PORT, e.g. 8888 or 6006:16006",
        )
    return int(text)


def parse_port_spec(spec: str) -> PortSpec:
    """``8888`` or ``8888:18888`` (the node's port, then this machine's)."""
    remote, separator, local = spec.strip().partition(":")
    return PortSpec(_port(remote, spec), _port(local, spec) if separator else None)


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be listened on now (a port another process
    listens on, or one this user may not bind, is not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no owner
        try:
            probe.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
        return True


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` itself holds a listening socket on 127.0.0.1:``port``
    (Linux: ``/proc/net/tcp`` and the process's descriptors); None where this
    machine cannot say (no ``/proc``).  A port merely not free may be another
    process's."""
    try:
        with open("/proc/net/tcp", encoding="ascii") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return None  # no /proc here (macOS): the caller judges by the port alone
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False  # the process has ended
    inodes = set()
    for row in rows:
        fields = row.split()
        if len(fields) < 10 or fields[3] != _TCP_LISTEN:
            continue
        address, _, hex_port = fields[1].partition(":")
        if address in _LOOPBACK_HEX and int(hex_port, 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{descriptor}") in inodes:
                return True
    return False


_TCP_LISTEN = "0A"
_LOOPBACK_HEX = ("0100007F", "7F000001")  # 127.0.0.1 as the kernel prints it, either byte order


def choose_forwards(
    specs: Sequence[PortSpec], *, say: Callable[[str], None], is_free: Callable[[int], bool] = port_is_free
) -> list[Forward]:
    """The local port of each spec: the one wanted when free, else the next free
    one (said in one line).  Two specs never get the same local port."""
    if not specs:
        raise UsageError("no port to forward", hint="name the node's port, e.g. `gpuflow forward NAME 8888`")
    chosen: list[Forward] = []
    for spec in specs:
        taken = {forward.local for forward in chosen}
        port = next_free_port(spec.wanted, taken, is_free)
        if port != spec.wanted:
            say(f"local port {spec.wanted} is taken: using {port}")
        chosen.append(Forward(spec.remote, port))
    return chosen


def next_free_port(wanted: int, taken: Iterable[int] = (), is_free: Callable[[int], bool] = port_is_free) -> int:
    """The first port from ``wanted`` that is free and not in ``taken`` (else a :class:`UsageError`)."""
    taken = set(taken)
    for port in range(wanted, min(wanted + PORT_TRIES, 65536)):
        if port not in taken and is_free(port):
            return port
    raise UsageError(
        f"no free local port from {wanted} to {min(wanted + PORT_TRIES, 65536) - 1}",
        hint="name another local port: REMOTE_PORT:LOCAL_PORT",
    )
