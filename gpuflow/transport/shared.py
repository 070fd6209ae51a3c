"""One SSH connection per command and node, shared by everything the command does.

Inside :func:`shared_connections` (``gpuflow run`` enters it), the runner
factory (:func:`gpuflow.nodes.runner_for`) hands out one runner per node and
thread instead of a new connection per call, and the programs gpuflow execs
``ssh`` for (sync's listing session and tar stream, rsync's ``-e``) ride on
that runner's paramiko connection too, through a *bridge*:

* the bridge is a unix socket served by a thread of this process; the ``ssh``
  they exec is :mod:`gpuflow.transport.bridge_client`, a tiny stdlib-only
  script that passes its stdin, stdout and stderr (the descriptors themselves,
  ``SCM_RIGHTS``) and its command over the socket and exits with the command's
  exit status; this process runs the command on a new channel of its one
  connection and pumps the bytes;
* the socket lives in a private directory (created 0700, checked to be owned by
  this user and not reachable by others) under ``$GPUFLOW_HOME/mux``, or under
  the temporary directory when that path would be too long for a unix socket;
  a connecting process must run as this user (``SO_PEERCRED``, on Linux);
* nothing outlives the command: the bridge is a thread of the command's own
  process, its directory is removed when the scope ends (success, error,
  Ctrl-C), and a directory left by a process that was killed is swept by the
  next scope (its owner's pid is in its name).

Host keys, keepalives and reconnecting are the runner's
(:class:`~gpuflow.transport.ssh.SSHRunner`): pinned keys only, SSH keepalives,
reconnect with backoff asking whether the instance still runs.  A shared runner
keeps its connection between the command's phases; after a failure, ``close()``
drops the connection as before, so the next use reconnects exactly as a new
runner would have.

Without a scope (every other command, the tests that build their own runners),
nothing changes: a new runner per call, sync on its own OpenSSH connection.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuflow.config import gpuflow_home
from gpuflow.errors import SecurityError
from gpuflow.records import CommandResult, SSHTarget
from gpuflow.transport.filestream import Fetched

CLIENT_SCRIPT = str(Path(__file__).with_name("bridge_client.py"))
# sun_path is 108 bytes on Linux, 104 on macOS; keep the socket's path under both.
_MAX_SOCKET_PATH = 100
_SOCKET_NAME = "s"
_CHUNK = 1 << 16


# ---------------------------------------------------------------------- the private directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(parent: Path) -> None:
    """Remove directories left by scopes whose process was killed (``<pid>-<random>``)."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            pid, _, _ = entry.name.partition("-")
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def check_private(directory: Path) -> None:
    """Refuse a socket directory another local user could reach or that is not ours."""
    info = os.lstat(directory)
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise SecurityError(f"{directory} is not a plain directory; refusing to put an SSH socket there")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SecurityError(
            f"{directory} is not private (owner {info.st_uid}, mode {info.st_mode & 0o777:o}); "
            "refusing to put an SSH socket there",
            hint="remove it; gpuflow recreates it with mode 700",
        )


def private_directory() -> Path:
    """A new 0700 directory for one scope's socket: under ``$GPUFLOW_HOME/mux`` when
    the socket's path fits a unix socket, else under the temporary directory."""
    parent = gpuflow_home() / "mux"
    prefix = f"{os.getpid()}-"
    if len(str(parent)) + len(prefix) + 8 + 1 + len(_SOCKET_NAME) + 3 > _MAX_SOCKET_PATH:
        parent = Path(tempfile.gettempdir()) / f"gpuflow-mux-{os.getuid()}"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(parent)
    _sweep(parent)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))  # 0700, ours
    check_private(directory)
    return directory


# ---------------------------------------------------------------------- the bridge


class Bridge:
    """Serves :mod:`~gpuflow.transport.bridge_client` sessions on one runner's connection."""

    def __init__(self, runner: Any, path: Path) -> None:
        self.runner = runner
        self.path = str(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o077)
        try:
            self._server.bind(self.path)
        finally:
            os.umask(previous)
        self._server.listen(16)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="gpuflow-bridge", daemon=True)
        self._thread.start()

    @property
    def argv(self) -> list[str]:
        """The ``ssh`` to exec instead of OpenSSH's (without host and command)."""
        return [sys.executable, "-I", "-S", CLIENT_SCRIPT, self.path]

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(client,), name="gpuflow-bridge-session", daemon=True).start()

    def _session(self, client: socket.socket) -> None:
        descriptors: list[int] = []
        try:
            with client:
                header, descriptors, _, _ = socket.recv_fds(client, 8, 3)
                if _peer_uid(client) not in (None, os.getuid()) or len(descriptors) != 3 or len(header) != 8:
                    return
                length = struct.unpack("!Q", header)[0]
                command = b""
                while len(command) < length:
                    chunk = client.recv(min(_CHUNK, length - len(command)))
                    if not chunk:
                        return
                    command += chunk
                status = self._run(command.decode(), *descriptors, client)
                descriptors = self._close_all(descriptors)
                with contextlib.suppress(OSError):
                    client.sendall(struct.pack("!i", status))
        finally:
            self._close_all(descriptors)

    @staticmethod
    def _close_all(descriptors: Sequence[int]) -> list[int]:
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                os.close(descriptor)
        return []

    def _run(self, command: str, stdin: int, stdout: int, stderr: int, client: socket.socket) -> int:
        try:
            channel = self.runner.open_channel(command)
        except Exception as exc:  # noqa: BLE001 - said on the client's stderr, as ssh would
            _write_all(stderr, f"gpuflow: {getattr(exc, 'message', None) or exc}\n".encode())
            return 255
        stop_read, stop_write = os.pipe()
        try:
            feeder = threading.Thread(target=_feed, args=(channel, stdin, stop_read), daemon=True)
            feeder.start()
            errors = threading.Thread(target=_drain, args=(channel.recv_stderr, stderr), daemon=True)
            errors.start()
            watcher = threading.Thread(target=_watch_client, args=(client, channel, stop_read), daemon=True)
            watcher.start()
            _drain(channel.recv, stdout)
            errors.join()
            status = channel.recv_exit_status()
            os.write(stop_write, b"x")  # ends the feeder and the watcher
            feeder.join(timeout=5)
            transport = channel.get_transport()
            if status < 0 and (transport is None or not transport.is_active()):
                _write_all(stderr, b"gpuflow: the SSH connection dropped while the command ran\n")
                return 255
            return status if status >= 0 else 255
        finally:
            with contextlib.suppress(Exception):
                channel.close()
            os.close(stop_read)
            os.close(stop_write)


def _peer_uid(client: socket.socket) -> int | None:
    """The user id of the process at the other end (Linux: ``SO_PEERCRED``); None where
    the platform has no such option (macOS): there the private directory alone guards it."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    return struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))[1]


def _write_all(descriptor: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            written = os.write(descriptor, view)
        except OSError:
            return False
        view = view[written:]
    return True


def _drain(receive: Callable[[int], bytes], descriptor: int) -> None:
    """Copy one of the channel's streams to ``descriptor`` until the stream ends."""
    broken = False
    while True:
        try:
            data = receive(_CHUNK)
        except Exception:  # noqa: BLE001 - a dropped connection ends the stream
            return
        if not data:
            return
        if not broken:
            broken = not _write_all(descriptor, data)  # a reader that went away: keep draining, drop the bytes


def _feed(channel: Any, descriptor: int, stop: int) -> None:
    """Copy ``descriptor`` (the client's stdin) to the channel, then send EOF."""
    try:
        while True:
            readable, _, _ = select.select([descriptor, stop], [], [])
            if stop in readable:
                return
            data = os.read(descriptor, _CHUNK)
            if not data:
                break
            channel.sendall(data)
        channel.shutdown_write()
    except Exception:  # noqa: BLE001 - the channel or the client went away
        return


def _watch_client(client: socket.socket, channel: Any, stop: int) -> None:
    """A client that goes away (killed, interrupted) ends its remote command, as ssh's death would."""
    with contextlib.suppress(Exception):
        readable, _, _ = select.select([client, stop], [], [])
        if client in readable and not client.recv(1, socket.MSG_PEEK):
            channel.close()


# ---------------------------------------------------------------------- runners shared within a command


class SharedRunner:
    """A runner handed out again and again within one scope.

    ``close()`` keeps the connection for the command's next phase, unless the
    last call failed: then it drops it (the next call reconnects), as closing a
    runner after a failure did before.  Everything else is the runner's own.
    """

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            result = method(*args, **kwargs)
        except BaseException:
            self._failed = True
            raise
        self._failed = False
        return result

    @property
    def base_dir(self) -> str:
        return self._call(lambda: self._runner.base_dir)

    @property
    def python(self) -> str:
        return self._runner.python

    @property
    def job_pythons(self) -> tuple[str, ...]:
        return self._runner.job_pythons

    @property
    def base_python(self) -> str | None:
        return self._call(lambda: self._runner.base_python)

    def run(self, argv: Sequence[str], **options: Any) -> CommandResult:
        return self._call(self._runner.run, argv, **options)

    def run_script(self, script: str, **options: Any) -> CommandResult:
        return self._call(self._runner.run_script, script, **options)

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        self._call(self._runner.put_bytes, data, remote_path, mode)

    def read_from(self, remote_path: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        return self._call(self._runner.read_from, remote_path, offset, limit)

    def get_file(self, remote_path: str, local_path: str) -> None:
        self._call(self._runner.get_file, remote_path, local_path)

    def fetch_files(self, remote_dir: str, items: Sequence[tuple[str, str]]) -> Iterator[Fetched]:
        try:
            yield from self._runner.fetch_files(remote_dir, items)
        except GeneratorExit:  # the caller stopped reading: not a failure of the connection
            raise
        except BaseException:
            self._failed = True
            raise
        self._failed = False

    def close(self) -> None:
        if self._failed:
            self._failed = False
            self._runner.close()

    def __enter__(self) -> SharedRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class Scope:
    """The connections of one command: its shared runners, and a bridge per SSH target."""

    runners: dict[Hashable, SharedRunner] = field(default_factory=dict)
    by_target: dict[SSHTarget, Any] = field(default_factory=dict)
    bridges: dict[SSHTarget, Bridge] = field(default_factory=dict)
    directory: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        with self.lock:
            bridges, runners = list(self.bridges.values()), list(self.runners.values())
            self.bridges.clear()
            self.runners.clear()
            self.by_target.clear()
        for bridge in bridges:
            bridge.close()
        for shared in runners:
            with contextlib.suppress(Exception):
                shared._runner.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


_current: Scope | None = None
_scope_lock = threading.Lock()


@contextlib.contextmanager
def shared_connections() -> Iterator[Scope]:
    """Within this block, one connection per node (and thread) carries everything;
    every connection, bridge and socket is closed when it ends, however it ends.
    Nested blocks share the outer one's."""
    global _current
    with _scope_lock:
        outer = _current
        if outer is None:
            _current = Scope()
    if outer is not None:
        yield outer
        return
    scope = _current
    assert scope is not None
    try:
        yield scope
    finally:
        with _scope_lock:
            _current = None
        scope.close()


def current_scope() -> Scope | None:
    return _current


def shared_runner(key: Hashable, target: SSHTarget | None, make: Callable[[], Any]) -> Any:
    """The runner of ``key`` in the current scope (made by ``make`` the first time
    in this thread), or ``make()`` itself outside any scope.  ``target``: the
    SSH target the runner reaches (None for a local directory), for the bridge."""
    scope = _current
    if scope is None:
        return make()
    key = (key, threading.get_ident())
    with scope.lock:
        shared = scope.runners.get(key)
    if shared is not None:
        return shared
    runner = make()
    shared = SharedRunner(runner)
    with scope.lock:
        scope.runners.setdefault(key, shared)
        shared = scope.runners[key]
        if target is not None and hasattr(runner, "open_channel"):
            scope.by_target.setdefault(target, runner)
    return shared


def bridge_argv(target: SSHTarget) -> list[str] | None:
    """The ``ssh`` argv (without host and command) that runs commands on the current
    scope's connection to ``target``, or None (no scope, or no runner for it yet:
    use OpenSSH).  The connection is made here, so that what refuses it (a changed
    host key, a refused key, an unreachable host) is raised as the runner raises it."""
    scope = _current
    if scope is None:
        return None
    with scope.lock:
        runner = scope.by_target.get(target)
        bridge = scope.bridges.get(target)
    if runner is None:
        return None
    if bridge is None:
        runner.connect()
        with scope.lock:
            bridge = scope.bridges.get(target)
            if bridge is None:
                if scope.directory is None:
                    scope.directory = private_directory()
                bridge = Bridge(runner, scope.directory / f"{_SOCKET_NAME}{len(scope.bridges)}")
                scope.bridges[target] = bridge
    return bridge.argv
