"""The detached sandbox server's life, seen from gpuflow's processes: start or reuse it, use it, stop it.

A moto server on 127.0.0.1 keeps the fake EC2 state across separate CLI
invocations (``up`` now, ``down`` later); boto3 clients point ``endpoint_url``
at it.  The server process itself is :mod:`infra.sandbox.serve`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.common import process_alive
from infra.errors import CloudError
from infra.sandbox.seed import accountless_environment

LOOPBACK = "127.0.0.1"
# Under <home>/sandbox/, next to the per-cluster "instance" directories; cluster
# names cannot start with a dot, so this can never collide with one.
SERVER_DIRECTORY_NAME = ".moto-server"
SERVER_RECORD_NAME = "server.json"
SERVER_LOG_NAME = "server.log"
SERVER_LOCK_NAME = ".lock"
# Every process that uses the server holds a shared flock on this file until it exits (the
# kernel drops it even on SIGKILL); the server is stopped only when no one else holds it.
SERVER_USERS_LOCK_NAME = "users.lock"
# A server that holds no resource and that no process uses exits by itself after this long.
ENV_IDLE_SECONDS = "GPUFLOW_SANDBOX_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 300.0
# The server answers this path itself (not moto): what it holds, in every region.
RESOURCES_PATH = "/gpuflow-sandbox/resources"
_SERVE_MARKER = "infra.sandbox"


@dataclass(frozen=True)
class SandboxServer:
    """What ``<home>/sandbox/.moto-server/server.json`` records."""

    pid: int
    port: int
    started_at: float

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def server_directory(home: Path) -> Path:
    directory = Path(home) / "sandbox" / SERVER_DIRECTORY_NAME
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


# This process's shared locks on users.lock (one per server directory), and the servers it started.
_USER_LOCKS: dict[Path, Any] = {}
_STARTED_HERE: dict[Path, SandboxServer] = {}
_RELEASE_AT_EXIT_REGISTERED = False


def sandbox_endpoint(
    home: Path, *, startup_timeout: float = 30.0, discard_command: list[str] | None = None
) -> str:
    """The URL of this gpuflow home's sandbox EC2/SSM API, starting it if needed.

    The server is a detached process (its own session, so Ctrl-C in the CLI
    does not kill it) listening on 127.0.0.1 only; boto3 clients use the URL
    as ``endpoint_url``.  A live server is reused, so fake clusters made by
    one ``gpuflow`` invocation are there for the next.  Concurrent callers
    serialise on a lock and get the same server.

    Who stops it: the process that started it, as it exits, when the server
    holds no resource and no other process uses it (:func:`release_started_servers`);
    otherwise the server itself once it has held nothing and served no one for
    ``$GPUFLOW_SANDBOX_IDLE_SECONDS`` (default 300).  Never a process that merely
    looked at it.

    ``discard_command`` (gpuflow's: how a sandbox instance's processes and directory
    end) lets a server started here host the instances' IMDS and carry out
    simulated interruptions (:mod:`infra.sandbox.imds`).
    """
    directory = server_directory(home)
    with _locked(directory / SERVER_LOCK_NAME) as lock_file:
        _hold_as_user(directory)
        record = read_server_record(home)
        if record is not None and _is_our_server_process(record.pid):
            # Alive: reuse it, however slow it answers -- never replace a server that may hold clusters.
            if _wait_until_healthy(record, startup_timeout):
                return record.url
            raise CloudError(
                f"the sandbox cloud (moto server, pid {record.pid}) does not answer on {record.url}",
                hint=f"see {directory / SERVER_LOG_NAME}; if it is stuck, `kill {record.pid}` ends it "
                "(and the sandbox clusters with it)",
            )
        if record is not None:
            _remove_record(directory)  # its process is gone, or the pid is now another program's: nothing to signal
        server = _start_server(directory, startup_timeout, lock_file, discard_command)
        _STARTED_HERE[directory] = server
        _register_release_at_exit()
        return server.url


def stop_sandbox(home: Path, *, timeout: float = 10.0) -> bool:
    """Stop this home's sandbox server now, whoever uses it; all fake cloud state
    goes with it (an explicit reset: gpuflow's commands never call this).

    Returns whether a server was running.  Idempotent.
    """
    directory = server_directory(home)
    with _locked(directory / SERVER_LOCK_NAME):
        record = read_server_record(home)
        _STARTED_HERE.pop(directory, None)
        _release_user(directory)
        if record is None:
            return False
        was_running = _terminate_server(record, timeout=timeout)
        _remove_record(directory)
        return was_running


def release_started_servers() -> list[SandboxServer]:
    """Stop each server this process started, unless it holds a resource (an
    instance, a key pair, a security group: asked of the server itself) or
    another process uses it; return those stopped.  Runs at exit (atexit), so
    every way a gpuflow command ends -- success, error, Ctrl-C -- stops the server
    it started only to look, or for an ``up`` that failed and rolled back."""
    stopped = []
    for directory, started in list(_STARTED_HERE.items()):
        _STARTED_HERE.pop(directory, None)
        with _locked(directory / SERVER_LOCK_NAME):
            _release_user(directory)
            if read_server_record(directory.parent.parent) != started:
                continue  # already stopped, or replaced by another process's server
            with try_flock(directory / SERVER_USERS_LOCK_NAME, fcntl.LOCK_EX) as unused:
                if not unused or server_holdings(started) != {}:
                    continue  # in use, holding something, or not answering: leave it
                _terminate_server(started)
                _remove_record(directory)
                stopped.append(started)
    return stopped


def release_emptied_server(home: Path) -> bool:
    """After a command emptied this home's sandbox server (``gpuflow setup --delete --sandbox``
    deleted the stack it was kept for): stop it when it now holds nothing and no other
    process uses it, as :func:`release_started_servers` does for a server started by the
    process itself; else leave it.  Returns whether it was stopped."""
    if read_server_record(home) is None:
        return False  # no server (or gpuflow's in-process cloud): nothing to stop, nothing made
    directory = server_directory(home)
    with _locked(directory / SERVER_LOCK_NAME):
        _release_user(directory)
        record = read_server_record(home)
        if record is None or not _is_our_server_process(record.pid):
            return False
        with try_flock(directory / SERVER_USERS_LOCK_NAME, fcntl.LOCK_EX) as unused:
            if not unused or server_holdings(record) != {}:
                return False  # in use, holding something, or not answering: leave it
            _terminate_server(record)
            _remove_record(directory)
            _STARTED_HERE.pop(directory, None)
            return True


def server_holdings(record: SandboxServer, timeout: float = 5.0) -> dict[str, list[str]] | None:
    """What the server holds, as the server itself reports it: ``{kind: [region/id, ...]}``
    for each kind it holds any of (so ``{}`` when empty); None when it does not answer."""
    import http.client

    connection = http.client.HTTPConnection(LOOPBACK, record.port, timeout=timeout)
    try:
        connection.request("GET", RESOURCES_PATH)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        document = json.loads(body)
        return {str(kind): [str(item) for item in items] for kind, items in document.items() if items}
    except (OSError, http.client.HTTPException, ValueError, AttributeError, TypeError):
        return None
    finally:
        connection.close()


def server_holding_stack(home: Path, region: str, stack_name: str) -> SandboxServer | None:
    """This home's running sandbox server when it holds ``stack_name`` in ``region`` (the
    account stack of ``gpuflow setup --sandbox``), else None.  Never starts a server."""
    record = read_server_record(home)
    if record is None or not _is_our_server_process(record.pid):
        return None
    holdings = server_holdings(record)
    if holdings is None or f"{region}/{stack_name}" not in holdings.get("stacks", []):
        return None
    return record


def _hold_as_user(directory: Path) -> None:
    """Hold a shared lock on ``users.lock`` until this process exits (or releases it)."""
    if directory in _USER_LOCKS:
        return
    handle = open(directory / SERVER_USERS_LOCK_NAME, "a+")  # noqa: SIM115 - held for the process's lifetime
    fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
    os.set_inheritable(handle.fileno(), False)
    _USER_LOCKS[directory] = handle


def _release_user(directory: Path) -> None:
    handle = _USER_LOCKS.pop(directory, None)
    if handle is not None:
        handle.close()


@contextlib.contextmanager
def try_flock(lock_path: Path, operation: int) -> Iterator[bool]:
    """Try to take a flock without waiting; yields whether it was taken."""
    with open(lock_path, "a+") as lock_file:
        try:
            fcntl.flock(lock_file.fileno(), operation | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _register_release_at_exit() -> None:
    global _RELEASE_AT_EXIT_REGISTERED
    if not _RELEASE_AT_EXIT_REGISTERED:
        import atexit

        atexit.register(release_started_servers)
        _RELEASE_AT_EXIT_REGISTERED = True


def _idle_seconds() -> float:
    try:
        value = float(os.environ.get(ENV_IDLE_SECONDS, DEFAULT_IDLE_SECONDS))
    except ValueError:
        return DEFAULT_IDLE_SECONDS
    return value if value > 0 else DEFAULT_IDLE_SECONDS


def read_server_record(home: Path) -> SandboxServer | None:
    path = Path(home) / "sandbox" / SERVER_DIRECTORY_NAME / SERVER_RECORD_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return SandboxServer(
            pid=int(document["pid"]), port=int(document["port"]), started_at=float(document["started_at"])
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # A torn or foreign file: treat as "no server"; the caller replaces it.
        return None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[Any]:
    """Hold the exclusive flock; it goes when the file is closed -- and, when a
    starting server inherited it, only once the server has closed it too (hence
    no explicit unlock, which would release it for both)."""
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        yield lock_file


def _remove_record(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / SERVER_RECORD_NAME).unlink()


def _is_our_server_process(pid: int, *, proc: Path = Path("/proc")) -> bool:
    """The pid is alive and is an ``infra.sandbox serve`` process, not an
    unrelated process that reused the pid.  Never signal what fails this."""
    if not process_alive(pid):
        return False
    words = _command_words(pid, proc=proc)
    return _SERVE_MARKER in words and "serve" in words


def _command_words(pid: int, *, proc: Path) -> list[str]:
    """The process's command line: from /proc where there is one, else from
    ``ps`` (macOS); empty when neither can tell."""
    if proc.is_dir():
        try:
            return [word.decode(errors="replace") for word in (proc / str(pid) / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            return []
    try:
        return subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []


def _health_check(port: int, timeout: float = 2.0) -> bool:
    """One HTTP request to moto's own dashboard route on loopback."""
    import http.client

    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("GET", "/moto-api/")
        response = connection.getresponse()
        body = response.read(4096)
        return response.status == 200 and b"moto" in body.lower()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _wait_until_healthy(record: SandboxServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _health_check(record.port):
            return True
        if time.monotonic() >= deadline or not _is_our_server_process(record.pid):
            return False
        time.sleep(0.2)


def _terminate_server(record: SandboxServer, *, timeout: float = 10.0) -> bool:
    """SIGTERM (then SIGKILL) the recorded server if it is still ours."""
    if not _is_our_server_process(record.pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _has_exited(record.pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGKILL)
    while not _has_exited(record.pid) and time.monotonic() < deadline + timeout:
        time.sleep(0.05)
    return True


def _has_exited(pid: int) -> bool:
    """Gone, or a zombie (then reaped when it is our child).  Identity is not
    re-checked here: an exiting process's cmdline reads empty before it dies.
    Our own child counts as gone only once reaped: its main thread can be a
    zombie while another thread is still being torn down."""
    try:
        reaped, _status = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        our_child = False
    else:
        if reaped == pid:
            return True
        our_child = True
    if not process_alive(pid):
        return True
    if our_child:
        return False
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    return False


def _start_server(
    directory: Path, startup_timeout: float, lock_file: Any, discard_command: list[str] | None = None
) -> SandboxServer:
    """Start the server and wait for its record.  The child inherits the start
    lock (the same open file, so the same flock) and lets go of it only once it
    has written its record: if this process dies meanwhile (even SIGKILL), the
    next caller waits for that record and reuses the server instead of starting
    a second one whose record would overwrite the first's."""
    log_path = directory / SERVER_LOG_NAME
    # The child must import this package even when gpuflow is not installed
    # (a source checkout): put the checkout first on its path.
    source_root = str(Path(__file__).resolve().parents[2])
    environment = accountless_environment(
        {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    )  # the fake cloud needs no credentials; keep real ones out of its environment
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, environment.get("PYTHONPATH", "")]))
    lock_fd = lock_file.fileno()
    command = [
        sys.executable, "-m", _SERVE_MARKER, "serve", "--directory", str(directory),
        "--lock-fd", str(lock_fd), "--idle-seconds", f"{_idle_seconds():g}",
    ]
    if discard_command:
        command += ["--discard-command", json.dumps(list(discard_command))]
    process: subprocess.Popen | None = None
    try:
        # The handle must exist before any Ctrl-C is handled: the child runs from inside Popen on.
        with _interrupts_deferred() as deliver_deferred, open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=str(directory),
                start_new_session=True,
                close_fds=True,
                pass_fds=(lock_fd,),
            )
        deliver_deferred()  # a Ctrl-C that came while the child was spawned is raised here, where it is cleaned up
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            exit_status = process.poll()
            if exit_status is not None:
                raise CloudError(
                    f"the sandbox cloud (a local moto server) exited at start with status {exit_status}: "
                    f"{_tail(log_path)}",
                    hint=f"see {log_path}; is moto[server] installed (pip install 'gpuflow[sandbox]')?",
                )
            record = read_server_record(directory.parent.parent)
            if record is not None and record.pid == process.pid and _health_check(record.port):
                return record
            time.sleep(0.05)
        raise CloudError(
            f"the sandbox cloud (a local moto server) did not answer within {startup_timeout:g} s",
            hint=f"see {log_path}",
        )
    except BaseException:
        # Timed out, or interrupted (Ctrl-C) while it started: a server no one will use must not be left.
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            _remove_record_of(directory, process.pid)
        raise


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[Any]:
    """Hold back SIGINT/SIGTERM's Python handlers while a child is spawned, and yield a
    function that runs the handler of any that came meanwhile.

    A signal handled inside ``subprocess.Popen`` -- after the child exists, before its
    handle is returned -- would leave a server no one can end.  Outside the main thread
    (where Python runs no handlers) nothing is changed.
    """
    import threading

    pending: list[tuple[int, Any]] = []
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for number in _DEFERRED_SIGNALS:
            handler = signal.getsignal(number)
            if callable(handler):
                saved[number] = handler
                signal.signal(number, lambda signum, frame: pending.append((signum, frame)))

    def deliver() -> None:
        for signum, frame in pending:
            saved[signum](signum, frame)

    try:
        yield deliver
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def _remove_record_of(directory: Path, pid: int) -> None:
    """Remove the record if it names ``pid`` (a server that has just been killed)."""
    record = read_server_record(directory.parent.parent)
    if record is not None and record.pid == pid:
        _remove_record(directory)


def _tail(path: Path, limit: int = 300) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "(no log)"
    lines = text.splitlines()
    return (lines[-1] if lines else "(empty log)")[-limit:]
