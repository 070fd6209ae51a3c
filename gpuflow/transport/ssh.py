"""The SSH transport: a :class:`~gpuflow.transport.base.CommandRunner` over paramiko.

The only module of gpuflow that imports paramiko, and only inside functions, so
importing it (or the CLI) stays cheap.

Security:

* host keys are checked against the cluster's pinned known_hosts only (never
  ``~/.ssh/known_hosts``, never AutoAddPolicy).  An unknown host is refused
  unless the caller passed the SHA256 fingerprints the instance printed on its
  console (then exactly such a key is accepted and pinned) or asked for
  trust-on-first-use (a warning, then the key seen is pinned);
* a key that differs from the pinned one raises :class:`HostKeyMismatch` and
  nothing is sent;
* only the target's own key file is offered (no agent, no ~/.ssh keys) when it
  has one; a key file its owner's group or others may access is refused with
  the ``chmod 600`` that fixes it, as OpenSSH refuses it
  (:func:`gpuflow.transport.keys.check_key_permissions`; paramiko alone would accept it, and the
  OpenSSH-based sync and ``gpuflow ssh`` would then fail).

Robustness: TCP keepalives at the SSH level (``transport.set_keepalive``); every
operation reconnects with exponential backoff when the connection fails, and
between attempts asks an optional ``instance_alive`` hook (wired to EC2 by
:func:`gpuflow.nodes.runner_for`) so that a stopped or terminated instance
ends in :class:`InstanceGone` at once instead of after every retry.  File
operations are repeated after a drop (they are idempotent: uploads go to a
temporary name and are renamed); a command is repeated only when the drop
happened before it was sent, otherwise :class:`ConnectionLost` tells the
caller its outcome is unknown.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from gpuflow.errors import (
    ConnectionLost,
    CredentialsError,
    GpuflowError,
    HostKeyMismatch,
    InstanceGone,
    RemoteCommandFailed,
    UnreachableHost,
)
from gpuflow.records import CommandResult, SSHTarget
from gpuflow.transport import filestream, hostkeys
from gpuflow.transport.filestream import Fetched
from gpuflow.transport.keys import check_key_permissions
from gpuflow.transport.pinning import PinningPolicy
from gpuflow.transport.base import base_python_lookup, env_prefix, quote_argv
from gpuflow.transport.openssh import CONNECT_TIMEOUT_SECONDS, SERVER_ALIVE_INTERVAL

_Result = TypeVar("_Result")

DEFAULT_REMOTE_BASE = "$HOME/gpuflow"  # expanded by the remote shell
_READ_CHUNK = 1 << 16
# After the exit status, how long to wait for EOF while no output arrives (see _collect).
_EOF_GRACE_SECONDS = 2.0
# A file stream that delivers nothing for this long is taken for a dead connection.
_STREAM_IDLE_SECONDS = 300.0
_STREAM_WINDOW = 64 << 20  # a file stream's channel window and largest packet (see _start_streamer)
_STREAM_PACKET = 1 << 20
# AES-GCM first: one AEAD call per packet where CTR needs a separate HMAC computed in Python's
# loop (a 200 MB read over loopback ~1.5x faster); OpenSSH servers offer both since 6.2
# (GCM is not affected by Terrapin either).  The rest stay as paramiko orders them.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


@dataclass(frozen=True)
class Backoff:
    """How often and how patiently to reconnect: ``retries`` further attempts
    after the first, waiting ``initial * factor**n`` seconds (capped)."""

    retries: int = 5
    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 15.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return min(self.maximum, self.initial * self.factor ** (attempt - 1))


class _CommandNotSent(Exception):
    """Internal: the connection failed before a command reached the server."""


class _Lost(Exception):
    """Internal: the connection failed after a command was sent."""


def _warn_stderr(message: str) -> None:
    print(f"gpuflow: warning: {message}", file=sys.stderr, flush=True)


# Where the Deep Learning AMIs keep their framework's Python (their release notes'
# "python_location"; the PyTorch ones say /opt/pytorch/bin/python).  A
# non-interactive SSH command does not activate it, so a job looks for it first.
AMI_FRAMEWORK_PYTHONS = ("/opt/tensorflow/bin/python3", "/opt/tensorflow/bin/python")


class SSHRunner:
    """Run commands and move files on one host over a single SSH connection.

    ``target`` says where and how (its ``known_hosts_path`` holds the pinned
    keys).  ``base_dir`` is the remote directory gpuflow keeps everything in:
    ``$HOME/gpuflow`` unless given (the loopback sandbox uses a directory under
    ``$GPUFLOW_HOME``); it is created and resolved to an absolute path once, on
    the first connection.  Commands run in ``base_dir`` unless ``cwd`` says
    otherwise, as with the local runner.

    Not thread-safe for concurrent calls from several threads; use one runner
    per thread (connections are cheap: ~0.1 s on loopback).
    """

    def __init__(
        self,
        target: SSHTarget,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        keepalive_interval: int = SERVER_ALIVE_INTERVAL,
        backoff: Backoff = Backoff(),
        sleep: Callable[[float], None] = time.sleep,
        instance_alive: Callable[[], bool] | None = None,
        base_dir: str | None = None,
        expected_fingerprints: Sequence[str] = (),
        warn: Callable[[str], None] = _warn_stderr,
        touch_heartbeat: bool = True,
        python: str = "python3",
        job_pythons: Sequence[str] = AMI_FRAMEWORK_PYTHONS,
    ) -> None:
        self.target = target
        self._python = python
        self._job_pythons = tuple(job_pythons)
        self._touch_heartbeat = touch_heartbeat
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.backoff = backoff
        self._sleep = sleep
        self._instance_alive = instance_alive
        self._requested_base = base_dir
        self._expected_fingerprints = tuple(expected_fingerprints)
        self._warn = warn
        self._client: Any = None  # paramiko.SSHClient
        self._sftp: Any = None  # paramiko.SFTPClient, opened on first file operation
        self._base_dir: str | None = None
        self._base_python: str | None = None  # answered with the base directory
        self._lock = threading.RLock()
        self.connections_made = 0  # how many times this runner (re)connected; for tests and diagnostics

    # ------------------------------------------------------------------ protocol

    @property
    def base_dir(self) -> str:
        if self._base_dir is None:
            self.connect()
        assert self._base_dir is not None
        return self._base_dir

    @property
    def python(self) -> str:
        return self._python

    @property
    def job_pythons(self) -> tuple[str, ...]:
        return self._job_pythons

    @property
    def base_python(self) -> str | None:
        self.base_dir  # noqa: B018 - connects if needed: the connection's first command answers both
        return self._base_python

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        command = env_prefix(env) + quote_argv(argv)
        return self._run_command(command, cwd=cwd, stdin=stdin, timeout=timeout, check=check)

    def run_script(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        command = env_prefix(env) + quote_argv(["bash", "-c", script])
        return self._run_command(command, cwd=None, stdin=stdin, timeout=timeout, check=check)

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        """Upload to a temporary name beside ``remote_path``, then rename over
        it (``posix-rename``): readers see the old or the new file, never half."""

        def upload(client: Any) -> None:
            sftp = self._sftp_client()
            path = PurePosixPath(remote_path)
            self._sftp_makedirs(sftp, str(path.parent))
            temporary = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                with sftp.open(temporary, "wb") as handle:
                    handle.set_pipelined(True)
                    handle.write(data)
                sftp.chmod(temporary, mode)
                sftp.posix_rename(temporary, str(path))
            except BaseException:
                with contextlib.suppress(Exception):
                    sftp.remove(temporary)
                raise

        self._with_reconnect(upload, what=f"upload to {remote_path}")

    def read_from(self, remote_path: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes from byte ``offset`` (pipelined SFTP reads); b''
        at end of file or when the file does not exist yet."""

        def read(client: Any) -> bytes:
            sftp = self._sftp_client()
            try:
                handle = sftp.open(remote_path, "rb")
            except FileNotFoundError:
                return b""
            with handle:
                size = handle.stat().st_size
                if offset >= size or limit <= 0:
                    return b""
                length = min(limit, size - offset)
                return b"".join(handle.readv([(offset, length)]))

        return self._with_reconnect(read, what=f"read {remote_path}")

    def get_file(self, remote_path: str, local_path: str) -> None:
        """Download with SFTP prefetch (pipelined: 25-100x faster than without)
        into a temporary file that is renamed into place when complete.

        Raises FileNotFoundError when the remote file does not exist."""
        destination = Path(local_path)
        destination.parent.mkdir(parents=True, exist_ok=True)

        def download(client: Any) -> None:
            sftp = self._sftp_client()
            temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.part")
            try:
                sftp.get(remote_path, str(temporary), prefetch=True)
                os.replace(temporary, destination)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    temporary.unlink()

        self._with_reconnect(download, what=f"download {remote_path}")

    def fetch_files(self, remote_dir: str, items: Sequence[tuple[str, str]]) -> Iterator[Fetched]:
        """All of ``items`` in one stream (:mod:`gpuflow.transport.filestream`) on one
        channel of this runner's connection: one round trip, not several per file.

        A drop before the streamer starts reconnects as any operation does; a
        drop during the stream raises :class:`ConnectionLost` (the files already
        yielded are complete; a repeated pull skips them)."""
        items = list(items)
        if not items:
            return
        with self._streamer([remote_dir]) as channel:
            threading.Thread(
                target=_feed_stdin, args=(channel, filestream.request([relative for relative, _ in items])), daemon=True
            ).start()
            with self._stream_errors(channel):
                yield from filestream.receive(channel.recv, items)

    @contextlib.contextmanager
    def pull_session(self, remote_dir: str, names: Sequence[str], *, push: bool = False) -> Iterator[_PullSession]:
        """One streamer for a whole pull (:class:`filestream.Session`): the listing of
        ``names`` under ``remote_dir``, the hashes and the files, on one channel and
        one remote process (``push``: every listed file sent right after the listing,
        unasked).  Errors as :meth:`fetch_files`."""
        with self._streamer([remote_dir, "--push-session" if push else "--session", *names]) as channel:
            session = _PullSession(self, channel, pushed=push)
            yield session
            session.finish()  # pushed files nobody took: read past them, so the streamer can end

    @contextlib.contextmanager
    def _streamer(self, arguments: Sequence[str]) -> Iterator[Any]:
        """A channel running :data:`filestream.STREAMER_PY` with ``arguments``; when the
        caller is done, its stdin ends (the streamer exits), its exit status is checked,
        and it is closed (always)."""
        channel = self._start_streamer(arguments)
        try:
            yield channel
            with contextlib.suppress(Exception):
                channel.shutdown_write()  # the streamer's end of input: it exits
            if channel.recv_exit_status() != 0:
                raise RemoteCommandFailed(f"streaming files from {self.target.host} failed: {_stderr_tail(channel)}")
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def _start_streamer(self, arguments: Sequence[str]) -> Any:
        """A channel running :data:`filestream.STREAMER_PY` with ``arguments``."""
        # -I -S: the streamer needs only the standard library; no site-packages' .pth files
        # to run at start-up (often most of a Python's start), no PYTHON* variables.
        command = quote_argv([self._python, "-I", "-S", "-c", filestream.STREAMER_PY, *arguments])

        # Large packets and window: fewer packets to decrypt and check in Python per byte,
        # no stall on window adjusts (a bare 200 MB read 10-27% faster, load 14-15); at most
        # the window (64 MiB) is buffered here.  Read-only: safe to repeat after a drop.
        channel = self._open_command(
            command, what="stream files", window_size=_STREAM_WINDOW, max_packet_size=_STREAM_PACKET
        )
        channel.settimeout(_STREAM_IDLE_SECONDS)
        return channel

    @contextlib.contextmanager
    def _stream_errors(self, channel: Any) -> Iterator[None]:
        """A broken stream as :class:`RemoteCommandFailed` when the streamer failed (the
        link is fine), else as :class:`ConnectionLost` (the connection is dropped)."""
        try:
            yield
        except (EOFError, OSError) as exc:  # StreamBroken is an EOFError
            if (
                channel.get_transport().is_active()
                and channel.status_event.wait(1)
                and channel.exit_status >= 0  # an exit status came: the streamer failed, the link is fine
            ):
                raise RemoteCommandFailed(
                    f"streaming files from {self.target.host} failed: {_stderr_tail(channel)}"
                ) from exc
            with self._lock:
                self._drop_connection()
            raise ConnectionLost(
                f"the SSH connection to {self._where} dropped while pulling files ({_describe(exc)})",
                hint="pull again: the files already pulled are kept",
            ) from exc

    def open_channel(self, command: str) -> Any:
        """A new session channel of this runner's connection running ``command``
        (connecting, or reconnecting with backoff, when the connection is down
        before the command is sent): for :mod:`gpuflow.transport.shared`, which
        carries other programs' ssh sessions (sync's) on this connection."""
        return self._open_command(command, what="open a session")

    def _open_command(self, command: str, *, what: str, **channel_options: Any) -> Any:
        """A new session channel (``channel_options``: its window and packet sizes) running
        ``command``, connecting or reconnecting with backoff until the command is sent."""

        def start(client: Any) -> Any:
            transport = client.get_transport()
            if transport is None or not transport.is_active():
                raise EOFError("SSH transport is not active")
            channel = transport.open_session(timeout=self.connect_timeout, **channel_options)
            try:
                channel.exec_command(command)
            except BaseException:
                with contextlib.suppress(Exception):
                    channel.close()
                raise
            return channel

        return self._with_reconnect(start, what=what)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> SSHRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ connection

    def connect(self) -> SSHRunner:
        """Open the connection now (with retries) instead of on first use."""
        self._with_reconnect(lambda client: None, what="connect")
        return self

    def check_host_key(self) -> None:
        """Connect and authenticate once, run nothing, disconnect: verifies the
        host key against the pins (and pins it when the console fingerprints or
        trust-on-first-use allow), e.g. before handing over to the system ssh."""
        self._with_reconnect(lambda client: client.close(), what="check the host key", connect=self._open_client)

    @property
    def _where(self) -> str:
        return f"{self.target.user}@{self.target.host}:{self.target.port}"

    def _connection(self) -> Any:
        """The live paramiko client, connecting when there is none or it died."""
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return self._client
                self._drop_connection()
            self._client = self._open_client()
            self.connections_made += 1
            try:
                self._after_connect()
            except BaseException:
                self._drop_connection()
                raise
            return self._client

    def _open_client(self) -> Any:
        paramiko = _import_paramiko()
        _quiet_paramiko_logging()
        target = self.target
        if target.key_path and not Path(target.key_path).expanduser().is_file():
            raise CredentialsError(
                f"SSH key file {target.key_path} not found",
                hint="the cluster's key is created by `gpuflow up`; check $GPUFLOW_HOME/keys",
            )
        private_key = None
        if target.key_path:
            try:
                private_key = paramiko.PKey.from_path(Path(target.key_path).expanduser())
            except (OSError, ValueError, paramiko.SSHException) as exc:
                raise CredentialsError(
                    f"cannot use the SSH key file {target.key_path}: {exc}",
                    hint="it must be an unencrypted OpenSSH/PEM private key (gpuflow creates one per cluster)",
                ) from exc
            check_key_permissions(target.key_path)
        client = paramiko.SSHClient()
        known_hosts = Path(target.known_hosts_path) if target.known_hosts_path else None
        if known_hosts is not None and known_hosts.is_file():
            client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(PinningPolicy(self))
        try:
            client.connect(
                target.host,
                port=target.port,
                username=target.user,
                pkey=private_key,
                allow_agent=private_key is None,
                look_for_keys=private_key is None,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                transport_factory=_new_transport,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyMismatch(
                f"host key of {target.host}:{target.port} changed: pinned "
                f"{hostkeys.sha256_fingerprint(exc.expected_key.asbytes())}, presented "
                f"{hostkeys.sha256_fingerprint(exc.key.asbytes())} ({exc.key.get_name()}); nothing was sent",
                hint=f"someone may be intercepting the connection; if the instance was really rebuilt, "
                f"remove {target.known_hosts_path} and connect again",
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise CredentialsError(
                f"{self._where} refused the SSH key {target.key_path or '(default keys)'}",
                hint="check the cluster's key file and SSH user",
            ) from exc
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        if self.keepalive_interval:
            transport.set_keepalive(int(self.keepalive_interval))
        return client

    def _after_connect(self) -> None:
        """Create and resolve the base directory once; touch the heartbeat the
        instance's dead-man's switch reads on every connection (not for a
        runner that only looks, e.g. `gpuflow status`: looking must not keep
        the instance up); and, after a NUL, look up :attr:`base_python` in the
        same command (a few tests in the same shell, no round trip of its own)."""
        base = quote_argv([self._requested_base]) if self._requested_base else f'"{DEFAULT_REMOTE_BASE}"'
        touch = "touch heartbeat; " if self._touch_heartbeat else ""
        lookup = base_python_lookup(self._job_pythons, self._python)
        script = f"set -e; mkdir -p {base}; cd {base}; {touch}pwd -P; printf '\\000'; {lookup}"
        result = self._exec(quote_argv(["sh", "-c", script]), stdin=None, timeout=self.connect_timeout)
        if result.exit_code == 255 and not result.stdout:
            # The session died under the command (a drop just after connecting): this
            # step is idempotent, so treat it as a lost connection and let the caller retry.
            raise _Lost() from EOFError("the SSH session ended while preparing the gpuflow directory")
        if result.exit_code != 0:
            raise RemoteCommandFailed(
                f"cannot create the gpuflow directory on {self.target.host}: "
                f"{result.stderr.decode(errors='replace').strip()[-300:]}"
            )
        directory, _, python = result.stdout.partition(b"\0")
        resolved = directory.decode().strip()
        if not resolved.startswith("/"):
            raise RemoteCommandFailed(f"unexpected answer resolving the gpuflow directory: {resolved[:100]!r}")
        found = python.decode(errors="replace").strip().splitlines()
        self._base_python = found[-1] if found else None
        self._base_dir = resolved

    def _drop_connection(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _sftp_client(self) -> Any:
        if self._sftp is None:
            self._sftp = self._connection().open_sftp()
        return self._sftp

    @staticmethod
    def _sftp_makedirs(sftp: Any, directory: str) -> None:
        missing: list[str] = []
        current = PurePosixPath(directory)
        while str(current) not in ("/", "."):
            try:
                sftp.stat(str(current))
                break
            except FileNotFoundError:
                missing.append(str(current))
                current = current.parent
        for path in reversed(missing):
            with contextlib.suppress(OSError):  # created meanwhile by someone else
                sftp.mkdir(path)

    def _is_connection_failure(self, exc: BaseException) -> bool:
        """Socket errors, SSH protocol errors and EOFs are connection failures
        when the connection is in fact gone (an SFTP 'no such file' is an OSError
        too, but arrives over a healthy connection)."""
        import paramiko

        if isinstance(exc, (paramiko.BadHostKeyException, paramiko.AuthenticationException)):
            return False
        if not isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError, EOFError, paramiko.SSHException)):
            return True
        client = self._client
        transport = client.get_transport() if client is not None else None
        return transport is None or not transport.is_active()

    def _with_reconnect(
        self, operation: Callable[[Any], _Result], *, what: str, connect: Callable[[], Any] | None = None
    ) -> _Result:
        """Run ``operation(client)``; on a connection failure reconnect with
        backoff and run it again (operations passed here are idempotent)."""
        connect = connect or self._connection
        attempt = 0
        while True:
            try:
                return operation(connect())
            except (_CommandNotSent, _Lost) as exc:
                last_error: BaseException = exc.__cause__ or exc
            except GpuflowError:
                raise
            except Exception as exc:
                if not self._is_connection_failure(exc):
                    raise
                last_error = exc
            with self._lock:
                self._drop_connection()
            attempt += 1
            self._give_up_if_gone(last_error)
            if attempt > self.backoff.retries:
                raise UnreachableHost(
                    f"cannot reach {self._where} over SSH ({what}) after {attempt} attempts: "
                    f"{_describe(last_error)}",
                    hint=f"check that the instance is running (`gpuflow status`), that its security group "
                    f"allows your address on port {self.target.port}, and your network",
                ) from last_error
            self._sleep(self.backoff.delay(attempt))

    def _give_up_if_gone(self, last_error: BaseException) -> None:
        if self._instance_alive is None:
            return
        try:
            alive = self._instance_alive()
        except GpuflowError:
            return  # the cloud could not say: keep retrying the connection
        if not alive:
            raise InstanceGone.no_longer_running(
                f"at {self.target.host}", f"SSH failed: {_describe(last_error)}"
            ) from last_error

    # ------------------------------------------------------------------ commands

    def _run_command(
        self,
        command: str,
        *,
        cwd: str | None,
        stdin: bytes | None,
        timeout: float | None,
        check: bool,
    ) -> CommandResult:
        def attempt(client: Any) -> CommandResult:
            directory = cwd if cwd is not None else self.base_dir
            full_command = f"cd {quote_argv([directory])} && {command}"
            try:
                return self._exec(full_command, stdin=stdin, timeout=timeout)
            except _Lost as exc:
                raise ConnectionLost(
                    f"the SSH connection to {self._where} dropped while a command was running; "
                    f"whether it finished is unknown ({_describe(exc.__cause__ or exc)})",
                    hint="the next call reconnects; repeat the command if it is safe to run twice",
                ) from exc

        result = self._with_reconnect(attempt, what="run a command")
        if check and not result.ok:
            raise RemoteCommandFailed(
                f"command failed with exit code {result.exit_code} on {self.target.host}: "
                f"{result.stderr.decode(errors='replace').strip()[-300:]}"
            )
        return result

    def _exec(self, command: str, *, stdin: bytes | None, timeout: float | None) -> CommandResult:
        """Run one command on a new channel of the current connection and
        collect its output; the channel is always closed."""
        client = self._client
        try:
            transport = client.get_transport()
            if transport is None or not transport.is_active():
                raise EOFError("SSH transport is not active")
            channel = transport.open_session(timeout=self.connect_timeout)
        except Exception as exc:
            raise _CommandNotSent() from exc
        try:
            try:
                channel.exec_command(command)
            except Exception as exc:
                raise _Lost() from exc
            return self._collect(channel, stdin=stdin, timeout=timeout)
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def _collect(self, channel: Any, *, stdin: bytes | None, timeout: float | None) -> CommandResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        feeder = threading.Thread(target=_feed_stdin, args=(channel, stdin or b""), daemon=True)
        feeder.start()
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        poll_fd = channel.fileno()
        last_output = time.monotonic()
        status_seen_at: float | None = None
        while True:
            received = False
            while channel.recv_ready():
                stdout.append(channel.recv(_READ_CHUNK))
                received = True
            while channel.recv_stderr_ready():
                stderr.append(channel.recv_stderr(_READ_CHUNK))
                received = True
            if received:
                last_output = time.monotonic()
            if channel.exit_status_ready():
                status_seen_at = status_seen_at or time.monotonic()
                # OpenSSH may send the exit status *before* the last of the output, so the
                # output is complete only at EOF (or close).  A background process that
                # kept the command's stdout open never lets EOF come: after a quiet grace
                # period following the status, take what arrived.
                quiet = time.monotonic() - max(last_output, status_seen_at)
                if channel.eof_received or channel.closed or quiet > _EOF_GRACE_SECONDS:
                    while channel.recv_ready():
                        stdout.append(channel.recv(_READ_CHUNK))
                    while channel.recv_stderr_ready():
                        stderr.append(channel.recv_stderr(_READ_CHUNK))
                    break
            if channel.closed or not channel.get_transport().is_active():
                raise _Lost() from EOFError("connection closed before the command's exit status arrived")
            if deadline is not None and time.monotonic() > deadline:
                raise UnreachableHost(f"command timed out after {timeout:g}s on {self.target.host}")
            if not received:
                if channel.eof_received:
                    # The polling pipe stays readable after EOF: wait on the status instead.
                    channel.status_event.wait(0.05)
                else:
                    select.select([poll_fd], [], [], 0.2)
        exit_code = channel.recv_exit_status()
        if exit_code < 0 and not channel.get_transport().is_active():
            # paramiko ends a channel of a dead connection as "no exit status".
            raise _Lost() from EOFError("connection closed before the command's exit status arrived")
        # -1: killed by a signal (exit-signal, no status); report it as OpenSSH's client does.
        return CommandResult(exit_code if exit_code >= 0 else 255, b"".join(stdout), b"".join(stderr))


def _import_paramiko() -> Any:
    """paramiko, imported without the optional ``invoke`` its ``paramiko.config`` tries
    (for ssh_config's ``Match exec``, which gpuflow never parses: it gives paramiko its
    options directly).  Installed beside fabric, invoke pulls in ``unittest.mock`` and a
    YAML parser: ~50 ms of every command that connects.  ``invoke`` stays importable for
    anyone else once paramiko is loaded.

    Nor does it load :mod:`importlib.metadata` (and the email parser it parses METADATA
    with) for paramiko's only use of it, ``__version__ = metadata.version("paramiko")``:
    while paramiko imports, a stand-in answers that from the name of paramiko's installed
    ``paramiko-VERSION.dist-info`` (anything else it is asked goes to the real module);
    where there is no such single directory, the real module is used."""
    import importlib

    if "paramiko" in sys.modules:
        return sys.modules["paramiko"]
    stand_ins: dict[str, Any] = {}
    if "invoke" not in sys.modules:
        stand_ins["invoke"] = None  # `import invoke` raises ImportError
    if "importlib.metadata" not in sys.modules:
        version = _installed_version("paramiko")
        if version is not None:
            stand_ins["importlib.metadata"] = _metadata_stand_in("paramiko", version)
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("paramiko")
    finally:
        for name, stand_in in stand_ins.items():
            if name in sys.modules and sys.modules[name] is stand_in:
                del sys.modules[name]


def _installed_version(distribution: str) -> str | None:
    """The version in the name of ``distribution``'s one ``NAME-VERSION.dist-info`` beside its
    package (what ``importlib.metadata.version`` reads), or None (not found, or not one)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(distribution)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(os.path.dirname(spec.origin))
    prefix, suffix = f"{distribution}-", ".dist-info"
    try:
        found = [name for name in os.listdir(site) if name.startswith(prefix) and name.endswith(suffix)]
    except OSError:
        return None
    version = found[0][len(prefix):-len(suffix)] if len(found) == 1 else ""
    return version if version and "-" not in version else None


def _metadata_stand_in(distribution: str, version: str) -> Any:
    """A module that answers ``version(distribution)`` and hands every other question to the
    real :mod:`importlib.metadata` (importing it then)."""
    import types

    stand_in = types.ModuleType("importlib.metadata")

    def real() -> Any:
        if sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]
        import importlib.metadata

        return importlib.metadata

    def version_of(name: str) -> str:
        return version if name == distribution else real().version(name)

    stand_in.version = version_of  # type: ignore[attr-defined]
    stand_in.__getattr__ = lambda name: getattr(real(), name)  # type: ignore[attr-defined]
    return stand_in


def _new_transport(sock: Any, **options: Any) -> Any:
    """A paramiko transport that offers :data:`PREFERRED_CIPHERS` first (the server picks
    the first of ours it also has)."""
    paramiko = _import_paramiko()

    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock, **options)
    security = transport.get_security_options()
    offered = tuple(security.ciphers)
    security.ciphers = tuple(name for name in PREFERRED_CIPHERS if name in offered) + tuple(
        name for name in offered if name not in PREFERRED_CIPHERS
    )
    return transport


def _quiet_paramiko_logging() -> None:
    """paramiko logs a dropped connection ("Socket exception: Connection reset
    by peer") at ERROR; with no logging configured Python prints that on
    stderr, outside gpuflow's one-line errors.  A dropped connection is handled
    here (reconnect, or a clear error), so give paramiko's logger a sink unless
    the application configured one."""
    import logging

    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


class _PullSession:
    """:class:`filestream.Session` on an SSH channel, its stream errors told apart
    (:meth:`SSHRunner._stream_errors`)."""

    def __init__(self, runner: SSHRunner, channel: Any, *, pushed: bool = False) -> None:
        self._errors = lambda: runner._stream_errors(channel)
        with self._errors():
            self._session = filestream.Session(channel.sendall, channel.recv, pushed=pushed)
        self.listing = self._session.listing

    @property
    def pushed(self) -> bool:
        return self._session.pushed

    def finish(self) -> None:
        with self._errors():
            self._session.finish()

    def hashes(self, relatives: Sequence[str]) -> dict[str, str]:
        with self._errors():
            return self._session.hashes(relatives)

    def fetch(self, items: Sequence[tuple[str, str]]) -> Iterator[Fetched]:
        with self._errors():
            yield from self._session.fetch(items)


def _feed_stdin(channel: Any, data: bytes) -> None:
    """Send stdin from a thread: a command that writes a lot before reading all
    its input would otherwise deadlock against a blocked sendall."""
    with contextlib.suppress(Exception):
        if data:
            channel.sendall(data)
        channel.shutdown_write()


def _stderr_tail(channel: Any) -> str:
    """What a failed remote command said on stderr (the end of it, on one line)."""
    chunks = []
    with contextlib.suppress(Exception):
        while channel.recv_stderr_ready():
            chunks.append(channel.recv_stderr(_READ_CHUNK))
    text = b"".join(chunks).decode(errors="replace").strip().replace("\n", " ")
    return text[-300:] or f"exit code {channel.recv_exit_status()}"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
