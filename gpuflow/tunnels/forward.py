"""`gpuflow forward`: local ports on 127.0.0.1 reaching ports on a node's loopback, kept up until Ctrl-C.

Through the system ``ssh -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE`` with exactly the
options `gpuflow ssh` uses (:mod:`gpuflow.transport.openssh`: the cluster's key,
its pinned host keys, ``-F none``, ``BatchMode``, keepalives) plus
``ExitOnForwardFailure``: a forward that cannot listen ends the ssh at once
instead of leaving a tunnel without its port.  The ssh runs in its own session
(process group): Ctrl-C or SIGTERM ends it and everything it started, and it
is restarted with backoff when the connection drops.

Its remote command keeps the session logged in and touches the node's
heartbeat every 30 s, so an open forward counts as use for the dead-man's
switch (``ssh -N`` logs no session in: ``sshd: user``, no ``@``).

A sandbox node without a loopback sshd is this machine: the same local port
relays to its 127.0.0.1 port from this process (:class:`RelayTunnel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gpuflow import nodes
from gpuflow.errors import GpuflowError, InstanceGone, UnreachableHost
from gpuflow.nodes import CloudProbe
from gpuflow.records import Cluster, SSHTarget
from gpuflow.transport import openssh
from gpuflow.transport.base import quote_argv
from gpuflow.tunnels.ports import LOOPBACK, Forward, listens_on, next_free_port, port_is_free
from gpuflow.tunnels.registry import TunnelKind, registered

HEARTBEAT_SECONDS = 30
READY_SECONDS = openssh.CONNECT_TIMEOUT_SECONDS + 15  # connect, authenticate, listen
STOP_GRACE_SECONDS = 3.0


def end_with_parent() -> None:
    """In a child gpuflow starts (ssh, a local TensorBoard), before exec: on Linux, SIGTERM
    it when gpuflow dies, even by SIGKILL (which runs no cleanup); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TunnelFailed(Exception):
    """A tunnel could not be set up, or ended: the reason in one line."""


class LocalPortTaken(TunnelFailed):
    """A local port another process took between its choice (a probe) and the tunnel's bind."""

    def __init__(self, message: str, port: int):
        super().__init__(message)
        self.port = port


PORT_TAKEN_TRIES = 5  # first starts that found a chosen local port taken meanwhile, each moving to the next free one
_CONNECTION_CLOSED = re.compile(r"^Connection to \S+ closed\.?$")
_BIND_FAILED = re.compile(r"bind \[?127\.0\.0\.1\]?:(\d+): Address already in use")


class Tunnel(Protocol):
    forwards: list[Forward]

    def start(self) -> None:
        """Set it up; return once every local port listens (else :class:`TunnelFailed`)."""

    def ended(self) -> str | None:
        """None while it is up; why it ended otherwise."""

    def stop(self) -> None:
        """End it and everything it started."""


# ---------------------------------------------------------------------- OpenSSH


def heartbeat_command(base_dir: str | None) -> str:
    """The remote command of a forward's session: touch the heartbeat now and
    every 30 s (``base_dir`` None: the instance's ``~/gpuflow``).  Its ``echo``
    into the closed channel ends it once the connection is gone."""
    script = (
        'base="${1:-$HOME/gpuflow}"; '
        f'while :; do mkdir -p "$base" && touch "$base/heartbeat"; echo . || exit 0; sleep {HEARTBEAT_SECONDS}; done'
    )
    return quote_argv(["sh", "-c", script, "sh", *([base_dir] if base_dir else [])])


def forward_argv(
    target: SSHTarget, forwards: Sequence[Forward], base_dir: str | None = None, serve: Sequence[str] | None = None
) -> list[str]:
    """The ssh command line of a forward: the one option builder's options, one
    ``-L`` per forward bound to 127.0.0.1 on both ends.  Its remote command is
    the heartbeat loop (no terminal), or ``serve`` (a server whose life is the
    session's: it runs on a terminal, so the hang-up of a closed connection ends it)."""
    argv = [*openssh.ssh_argv(target), "-o", "ExitOnForwardFailure=yes", "-tt" if serve else "-T"]
    for forward in forwards:
        argv += ["-L", f"{LOOPBACK}:{int(forward.local)}:{LOOPBACK}:{int(forward.remote)}"]
    if serve:
        remote = _touch_once(base_dir) + "exec " + quote_argv(list(serve))
    else:
        remote = heartbeat_command(base_dir)
    return [*argv, "--", f"{target.user}@{target.host}", remote]


def _touch_once(base_dir: str | None) -> str:
    script = 'base="${1:-$HOME/gpuflow}"; mkdir -p "$base" && touch "$base/heartbeat"'
    return quote_argv(["sh", "-c", script, "sh", *([base_dir] if base_dir else [])]) + " 2>/dev/null; "


class SSHTunnel:
    """One ``ssh -L`` process, leader of its own process group."""

    def __init__(
        self, argv: Sequence[str], forwards: Sequence[Forward], *, ready_seconds: float = READY_SECONDS,
        remote_output: bool = False,
    ):
        self.argv = list(argv)
        self.forwards = list(forwards)
        self.ready_seconds = ready_seconds
        self.remote_output = remote_output  # a served command's terminal output: its last line says why it ended
        self.process: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self._stderr.seek(0)
        self._stderr.truncate()
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._stderr if self.remote_output else subprocess.DEVNULL,
                stderr=self._stderr, start_new_session=True, preexec_fn=end_with_parent,
            )
        except OSError as exc:
            raise TunnelFailed(f"cannot run {self.argv[0]}: {exc.strerror} (install the OpenSSH client)") from exc
        deadline = time.monotonic() + self.ready_seconds
        while time.monotonic() < deadline:
            reason = self.ended()
            if reason is not None:
                taken = self._taken_port()
                if taken is not None:
                    raise LocalPortTaken(reason, taken)
                raise TunnelFailed(reason)
            if self._listening():
                return  # ssh listens on every local port
            time.sleep(0.05)
        self.stop()
        raise TunnelFailed(f"no connection within {self.ready_seconds:.0f} s")

    def _listening(self) -> bool:
        """Whether this ssh listens on every local port: itself (a port another process
        took meanwhile is not ours; ExitOnForwardFailure then ends the ssh), or, where
        the owner cannot be told, the port no longer free."""
        assert self.process is not None
        for forward in self.forwards:
            owned = listens_on(self.process.pid, forward.local)
            if owned is False or (owned is None and port_is_free(forward.local)):
                return False
        return True

    def _taken_port(self) -> int | None:
        """The local port that made this (ended) ssh fail: one another process holds
        now (this ssh holds none any more), or the one its bind error names."""
        for forward in self.forwards:
            if not port_is_free(forward.local):
                return forward.local
        self._stderr.seek(0)
        named = _BIND_FAILED.search(self._stderr.read().decode(errors="replace"))
        return int(named.group(1)) if named else None

    def ended(self) -> str | None:
        if self.process is None or self.process.poll() is None:
            return None
        return self._last_error() or f"ssh exited with status {self.process.returncode}"

    def _last_error(self) -> str:
        """The last line that says something (ssh's own "Connection to HOST closed." does not)."""
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()]
        lines = [line for line in lines if not _CONNECTION_CLOSED.match(line)]
        return lines[-1] if lines else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:  # still ours: its group is signalled, never a reaped pid's
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


# ---------------------------------------------------------------------- the sandbox without sshd


class RelayTunnel:
    """A sandbox node without sshd is this machine: relay each local port to
    127.0.0.1:REMOTE from this process, touching the node's heartbeat as an SSH
    forward does."""

    def __init__(self, forwards: Sequence[Forward], heartbeat: Path | None = None):
        self.forwards = list(forwards)
        self.heartbeat = heartbeat
        self._listeners: list[socket.socket] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._failure: str | None = None

    def start(self) -> None:
        self._stopped.clear()
        try:
            for forward in self.forwards:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._listeners.append(listener)
                try:
                    listener.bind((LOOPBACK, forward.local))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise LocalPortTaken(f"cannot listen on {LOOPBACK}:{forward.local}: {exc.strerror}",
                                             forward.local) from exc
                    raise
                listener.listen(64)
        except LocalPortTaken:
            self.stop()
            raise
        except OSError as exc:
            self.stop()
            raise TunnelFailed(f"cannot listen on {LOOPBACK}: {exc.strerror}") from exc
        for listener, forward in zip(self._listeners, self.forwards):
            threading.Thread(target=self._accept, args=(listener, forward.remote), daemon=True).start()
        if self.heartbeat is not None:
            threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        assert self.heartbeat is not None
        while not self._stopped.is_set():
            with contextlib.suppress(OSError):
                self.heartbeat.touch()
            self._stopped.wait(HEARTBEAT_SECONDS)

    def _accept(self, listener: socket.socket, remote: int) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                if not self._stopped.is_set():
                    self._failure = "the local listener closed"
                return
            threading.Thread(target=self._relay, args=(client, remote), daemon=True).start()

    def _relay(self, client: socket.socket, remote: int) -> None:
        try:
            server = socket.create_connection((LOOPBACK, remote), timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()  # as ssh does: nothing listens there, the connection is closed
            return
        with self._lock:
            self._connections.update((client, server))
        pump = threading.Thread(target=_pump, args=(server, client), daemon=True)
        pump.start()
        _pump(client, server)
        pump.join()
        with self._lock:
            self._connections.difference_update((client, server))
        client.close()
        server.close()

    def ended(self) -> str | None:
        return self._failure

    def stop(self) -> None:
        self._stopped.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept() (close alone does not)
            listener.close()
        self._listeners = []
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------- supervision


@dataclass(frozen=True)
class Backoff:
    """Waits between reconnections: ``first`` doubling up to ``cap``; back to
    ``first`` once a connection stayed up ``healthy_after`` seconds."""

    first: float = 1.0
    cap: float = 30.0
    healthy_after: float = 60.0


def supervise(
    open_tunnel: Callable[[], Tunnel],
    *,
    describe: str,
    say: Callable[[str], None],
    node_alive: Callable[[], bool],
    on_ready: Callable[[Tunnel], None] = lambda tunnel: None,
    relisten: Callable[[LocalPortTaken], Callable[[], Tunnel]] | None = None,
    backoff: Backoff = Backoff(),
    poll_seconds: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Keep a tunnel up until interrupted (Ctrl-C, SIGTERM as KeyboardInterrupt):
    the first connection must succeed (else :class:`UnreachableHost`; a local
    port taken meanwhile is first moved by ``relisten``, which gives the new
    tunnel factory); a dropped one is restarted with backoff, as long as the
    node still runs (else :class:`InstanceGone`).  The tunnel is stopped on
    every way out."""
    tunnel = open_tunnel()
    try:
        for attempt in range(1, PORT_TAKEN_TRIES + 1):
            try:
                tunnel.start()
                break
            except LocalPortTaken as exc:
                if relisten is None or attempt == PORT_TAKEN_TRIES:
                    raise UnreachableHost(
                        f"cannot forward to {describe}: {exc}", hint="name another local port: REMOTE_PORT:LOCAL_PORT"
                    ) from exc
                tunnel.stop()
                open_tunnel = relisten(exc)
                tunnel = open_tunnel()
            except TunnelFailed as exc:
                raise UnreachableHost(
                    f"cannot forward to {describe}: {exc}",
                    hint="`gpuflow ssh NAME` shows whether the node can be reached",
                ) from exc
        on_ready(tunnel)
        delay, since = backoff.first, time.monotonic()
        while True:
            reason = tunnel.ended()
            if reason is None:
                sleep(poll_seconds)
                continue
            if time.monotonic() - since >= backoff.healthy_after:
                delay = backoff.first
            while True:  # until a new connection is up
                tunnel.stop()
                if not _still_running(node_alive):
                    raise InstanceGone(f"the node behind {describe} is no longer running ({reason})")
                say(f"connection to {describe} lost ({reason}); reconnecting in {delay:.0f} s")
                sleep(delay)
                delay = min(delay * 2, backoff.cap)
                tunnel = open_tunnel()
                try:
                    tunnel.start()
                except TunnelFailed as exc:
                    reason = str(exc)
                    continue
                break
            since = time.monotonic()
            say(f"reconnected to {describe}")
            on_ready(tunnel)
    finally:
        tunnel.stop()


def _still_running(node_alive: Callable[[], bool]) -> bool:
    try:
        return node_alive()
    except GpuflowError:  # the cloud cannot say (offline laptop): keep trying
        return True


# ---------------------------------------------------------------------- the use case


@dataclass(frozen=True)
class ForwardPlan:
    """How the forwards of one node are held: its forwards, the tunnel factory and what says the node still runs."""

    describe: str
    instance_id: str
    forwards: tuple[Forward, ...]
    make_tunnel: Callable[[Sequence[Forward]], Tunnel]
    node_alive: Callable[[], bool]

    def open_tunnel(self) -> Tunnel:
        return self.make_tunnel(self.forwards)

    def moved(self, port: int, say: Callable[[str], None]) -> ForwardPlan:
        """The plan with local ``port`` (taken by another process after it was
        chosen) replaced by the next free one, said in one line.  No remote port's
        number either: a sandbox node is this machine."""
        others = {forward.local for forward in self.forwards} | {forward.remote for forward in self.forwards}
        new = next_free_port(port + 1, others)
        say(f"local port {port} was taken meanwhile: using {new}")
        forwards = tuple(Forward(f.remote, new) if f.local == port else f for f in self.forwards)
        return dataclasses.replace(self, forwards=forwards)


def plan_forward(
    cluster: Cluster,
    forwards: Sequence[Forward],
    *,
    instance_id: str | None = None,
    trust_on_first_use: bool = False,
    probe: CloudProbe | None = None,
    project_dir: Path | None = None,
    serve: Sequence[str] | None = None,
) -> ForwardPlan:
    """Reach the node (pinning its host keys first, as `gpuflow ssh` does) and
    say how its forwards are opened: ``ssh -L``, or a relay for a sandbox node
    without sshd.  ``serve``: a server command the session runs (and ends)."""
    node = nodes.select_node(cluster, instance_id)
    reached = nodes.openssh_node(
        cluster, node, trust_on_first_use=trust_on_first_use, probe=probe, project_dir=project_dir
    )
    describe = cluster.name if node is cluster.head else f"{cluster.name} ({node.instance_id})"

    def alive() -> bool:
        return nodes.node_alive(cluster, node, probe, project_dir=project_dir)

    if reached is None:
        heartbeat = nodes.sandbox_directory(cluster, node) / "heartbeat"
        return ForwardPlan(describe, node.instance_id, tuple(forwards), lambda fw: RelayTunnel(fw, heartbeat), alive)
    target, base_dir = reached.target, reached.base_dir

    def ssh_tunnel(chosen: Sequence[Forward]) -> Tunnel:
        return SSHTunnel(forward_argv(target, chosen, base_dir, serve), chosen, remote_output=serve is not None)

    return ForwardPlan(describe, node.instance_id, tuple(forwards), ssh_tunnel, alive)


def hold_forwards(
    cluster: Cluster,
    plan: ForwardPlan,
    *,
    say: Callable[[str], None],
    on_ready: Callable[[Tunnel], None] = lambda tunnel: None,
    kind: TunnelKind = TunnelKind.FORWARD,
    url: Callable[[Sequence[Forward]], str] | None = None,
    backoff: Backoff = Backoff(),
) -> None:
    """Hold the plan's forwards until Ctrl-C / SIGTERM (which ends this normally),
    recorded for `gpuflow status` (the ports that listen, and ``url(forwards)``)
    from the moment they are up.  A local port another process took after it
    was chosen moves to the next free one (``tunnel.forwards`` are the ports
    that listen)."""
    current = [plan]

    def relisten(taken: LocalPortTaken) -> Callable[[], Tunnel]:
        current[0] = current[0].moved(taken.port, say)
        return current[0].open_tunnel

    with contextlib.ExitStack() as held:

        def ready(tunnel: Tunnel) -> None:
            if not held_open:
                forwards = list(tunnel.forwards)
                held.enter_context(
                    registered(cluster.name, plan.instance_id, kind, forwards, url(forwards) if url else None)
                )
                held_open.append(True)
            on_ready(tunnel)

        held_open: list[bool] = []
        try:
            supervise(
                plan.open_tunnel, describe=plan.describe, say=say, node_alive=plan.node_alive, on_ready=ready,
                relisten=relisten, backoff=backoff,
            )
        except KeyboardInterrupt:
            return
