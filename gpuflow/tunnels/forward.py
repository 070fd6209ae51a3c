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
import os
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
from gpuflow.tunnels.ports import LOOPBACK, Forward, listens_on, port_is_free
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


class Tunnel(Protocol):
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

    def __init__(self, argv: Sequence[str], forwards: Sequence[Forward], *, ready_seconds: float = READY_SECONDS):
        self.argv = list(argv)
        self.forwards = list(forwards)
        self.ready_seconds = ready_seconds
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
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
                start_new_session=True, preexec_fn=end_with_parent,
            )
        except OSError as exc:
            raise TunnelFailed(f"cannot run {self.argv[0]}: {exc.strerror} (install the OpenSSH client)") from exc
        deadline = time.monotonic() + self.ready_seconds
        while time.monotonic() < deadline:
            reason = self.ended()
            if reason is not None:
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

    def ended(self) -> str | None:
        if self.process is None or self.process.poll() is None:
            return None
        return self._last_error() or f"ssh exited with status {self.process.returncode}"

    def _last_error(self) -> str:
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()]
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
                listener.bind((LOOPBACK, forward.local))
                listener.listen(64)
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
    backoff: Backoff = Backoff(),
    poll_seconds: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Keep a tunnel up until interrupted (Ctrl-C, SIGTERM as KeyboardInterrupt):
    the first connection must succeed (else :class:`UnreachableHost`); a dropped
    one is restarted with backoff, as long as the node still runs (else
    :class:`InstanceGone`).  The tunnel is stopped on every way out."""
    tunnel = open_tunnel()
    try:
        try:
            tunnel.start()
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
    """How the forwards of one node are held: the tunnel factory and what says the node still runs."""

    describe: str
    instance_id: str
    open_tunnel: Callable[[], Tunnel]
    node_alive: Callable[[], bool]


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
        return ForwardPlan(describe, node.instance_id, lambda: RelayTunnel(forwards, heartbeat), alive)
    argv = forward_argv(reached.target, forwards, reached.base_dir, serve)
    return ForwardPlan(describe, node.instance_id, lambda: SSHTunnel(argv, forwards), alive)


def hold_forwards(
    cluster: Cluster,
    forwards: Sequence[Forward],
    plan: ForwardPlan,
    *,
    say: Callable[[str], None],
    on_ready: Callable[[Tunnel], None] = lambda tunnel: None,
    kind: TunnelKind = TunnelKind.FORWARD,
    url: str | None = None,
    backoff: Backoff = Backoff(),
) -> None:
    """Hold the forwards until Ctrl-C / SIGTERM (which ends this normally),
    recorded for `gpuflow status` while they are held."""
    with registered(cluster.name, plan.instance_id, kind, forwards, url):
        try:
            supervise(
                plan.open_tunnel, describe=plan.describe, say=say, node_alive=plan.node_alive, on_ready=on_ready,
                backoff=backoff,
            )
        except KeyboardInterrupt:
            return
