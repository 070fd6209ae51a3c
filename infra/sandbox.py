"""The sandbox cloud: the EC2 API is moto, "the instance" is this machine.

``gpuflow --sandbox`` runs the real ``infra/`` provisioning code against moto,
so a user (or their CI) can exercise the whole workflow with no AWS account.
Two shapes:

* :func:`in_process_sandbox` — ``moto.mock_aws()`` plus seeding, for one
  process that does everything (``gpuflow demo``, ``run --up ... --down``).
* :func:`sandbox_endpoint` — a detached moto server on 127.0.0.1 that keeps
  the fake EC2 state across separate CLI invocations (``up`` now, ``down``
  later); boto3 clients point ``endpoint_url`` at it.

moto lacks the Deep Learning AMI and its public SSM parameter, so both shapes
seed them with :func:`seed_deep_learning_ami`, using exactly the names the
provisioner resolves (:mod:`infra.dlami`).

moto is imported inside functions only: the CLI imports this module lazily,
and ``gpuflow --help`` must not pay for moto (~0.4 s).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuflow.errors import CloudError
from gpuflow.state import atomic_write_json, process_alive
from infra.dlami import (
    DLAMI_OWNER_ALIAS,
    DLAMI_OWNER_ID,
    DLAMI_SANDBOX_IMAGE_NAME,
    DLAMI_SSM_PARAMETERS,
)

DEFAULT_SANDBOX_REGION = "us-east-1"
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
# SigV4 credential scope: Credential=<key id>/<yyyymmdd>/<region>/<service>/aws4_request
_REGION_IN_AUTHORIZATION = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")


def _default_account_id() -> str:
    from moto.core import DEFAULT_ACCOUNT_ID

    return DEFAULT_ACCOUNT_ID


def seed_deep_learning_ami(region: str, *, account_id: str | None = None) -> str:
    """Register the Deep Learning AMI image and its public SSM parameters in
    the *active* moto backend (a ``mock_aws()`` context, or the moto server
    running in this process) for ``region``; return the AMI id.

    Idempotent: a second call in the same backend returns the same id.  The
    backends are written directly because moto refuses ``put_parameter``
    under ``/aws/`` and ``register_image`` cannot set Amazon as the owner.
    """
    import datetime

    from moto.backends import get_backend
    from moto.ec2.models.amis import Ami
    from moto.ec2.utils import random_ami_id
    from moto.ssm.models import Parameter

    account_id = account_id or _default_account_id()
    ec2_backend = get_backend("ec2")[account_id][region]
    image = next(
        (candidate for candidate in ec2_backend.amis.values() if candidate.name == DLAMI_SANDBOX_IMAGE_NAME),
        None,
    )
    if image is None:
        image = Ami(
            ec2_backend,
            random_ami_id(),
            name=DLAMI_SANDBOX_IMAGE_NAME,
            description="gpuflow sandbox stand-in for the AWS Deep Learning AMI with TensorFlow",
            owner_id=DLAMI_OWNER_ID,
            owner_alias=DLAMI_OWNER_ALIAS,
            public=True,
            virtualization_type="hvm",
            architecture="x86_64",
            root_device_type="ebs",
            root_device_name="/dev/sda1",
            creation_date=datetime.datetime(2024, 7, 1, tzinfo=datetime.timezone.utc),
            region_name=region,
        )
        ec2_backend.amis[image.id] = image

    ssm_backend = get_backend("ssm")[account_id][region]
    for parameter_name in DLAMI_SSM_PARAMETERS:
        versions = ssm_backend._parameters[parameter_name]
        if versions and versions[-1].value == image.id:
            continue
        versions.append(
            Parameter(
                account_id=account_id,
                name=parameter_name,
                value=image.id,
                parameter_type="String",
                description=None,
                allowed_pattern=None,
                keyid=None,
                last_modified_date=datetime.datetime.now(datetime.timezone.utc),
                version=len(versions) + 1,
                data_type="aws:ec2:image",
            )
        )
    return image.id


@contextlib.contextmanager
def in_process_sandbox(regions: tuple[str, ...] = (DEFAULT_SANDBOX_REGION,)) -> Iterator[dict[str, str]]:
    """``moto.mock_aws()`` with the Deep Learning AMI seeded.

    ``regions`` are seeded up front (yields ``{region: ami_id}``); any other
    region is seeded on the first boto3 request that names it, so the
    provisioner's own region choice works unchanged.  Everything boto3 does
    inside the block hits moto in this process; nothing leaves the machine.
    """
    from unittest import mock

    with mock.patch.dict(os.environ, _accountless_environment(os.environ), clear=True):
        from moto import mock_aws
        from moto.core import models as moto_models

        seeder = _RegionSeeder(seed_deep_learning_ami)
        stubber = getattr(moto_models, "botocore_stubber", None)
        with mock_aws():
            amis = {region: seeder.seed(region) for region in regions}
            if stubber is None or not hasattr(stubber, "process_request"):  # pragma: no cover - other moto versions
                yield amis
                return
            original_process_request = stubber.process_request

            def seeding_process_request(request: Any) -> Any:
                seeder.seed_from_authorization(request.headers.get("Authorization"))
                return original_process_request(request)

            with mock.patch.object(stubber, "process_request", seeding_process_request):
                yield amis


def _accountless_environment(environment: dict[str, str] | Any) -> dict[str, str]:
    """``environment`` for moto, which builds botocore sessions from it (at import and
    per backend): no AWS profile and no AWS config or credentials file, so an
    ``AWS_PROFILE`` naming no profile, or a config file that does not parse, cannot
    break the sandbox -- it needs no account -- and no ``AWS_ENDPOINT_URL*`` can
    send a request past the in-process mock."""
    kept = {
        key: value for key, value in environment.items()
        if key not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
        and not key.startswith("AWS_ENDPOINT_URL")  # moto intercepts AWS's own endpoints only
    }
    return {**kept, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


class _RegionSeeder:
    """Seeds each region once, the first time it is named (thread-safe: the
    server answers requests on several threads)."""

    def __init__(self, seed: Callable[[str], str]) -> None:
        self._seed = seed
        self._seeded: dict[str, str] = {}
        self._lock = threading.Lock()

    def seed(self, region: str) -> str:
        with self._lock:
            if region not in self._seeded:
                self._seeded[region] = self._seed(region)
            return self._seeded[region]

    def seed_from_authorization(self, authorization: str | bytes | None) -> None:
        """Seed the region of a SigV4-signed request; unsigned or unparsable
        requests, and regions moto does not know, are left to moto."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        match = _REGION_IN_AUTHORIZATION.search(authorization or "")
        if not match:
            return
        try:
            self.seed(match.group(1))
        except Exception as exc:  # noqa: BLE001 - an unknown region: moto answers the request itself
            print(f"gpuflow sandbox: could not seed region {match.group(1)!r}: {exc}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The detached sandbox server (state that outlives one CLI invocation)
# --------------------------------------------------------------------------


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


def sandbox_endpoint(home: Path, *, startup_timeout: float = 30.0) -> str:
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
        server = _start_server(directory, startup_timeout, lock_file)
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
            with _try_flock(directory / SERVER_USERS_LOCK_NAME, fcntl.LOCK_EX) as unused:
                if not unused or server_holdings(started) != {}:
                    continue  # in use, holding something, or not answering: leave it
                _terminate_server(started)
                _remove_record(directory)
                stopped.append(started)
    return stopped


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
def _try_flock(lock_path: Path, operation: int) -> Iterator[bool]:
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


def _start_server(directory: Path, startup_timeout: float, lock_file: Any) -> SandboxServer:
    """Start the server and wait for its record.  The child inherits the start
    lock (the same open file, so the same flock) and lets go of it only once it
    has written its record: if this process dies meanwhile (even SIGKILL), the
    next caller waits for that record and reuses the server instead of starting
    a second one whose record would overwrite the first's."""
    log_path = directory / SERVER_LOG_NAME
    # The child must import this package even when gpuflow is not installed
    # (a source checkout): put the checkout first on its path.
    source_root = str(Path(__file__).resolve().parent.parent)
    environment = _accountless_environment(
        {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    )  # the fake cloud needs no credentials; keep real ones out of its environment
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, environment.get("PYTHONPATH", "")]))
    lock_fd = lock_file.fileno()
    command = [
        sys.executable, "-m", _SERVE_MARKER, "serve", "--directory", str(directory),
        "--lock-fd", str(lock_fd), "--idle-seconds", f"{_idle_seconds():g}",
    ]
    with open(log_path, "ab") as log_file:
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
    deadline = time.monotonic() + startup_timeout
    try:
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
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        _remove_record_of(directory, process.pid)
        raise


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


class _SeedingMiddleware:
    """WSGI wrapper: seeds the Deep Learning AMI into a region the first time
    a request for that region arrives (read from the SigV4 credential scope),
    so ``gpuflow up --region R --sandbox`` resolves the AMI in any region
    without paying ~0.1 s per region up front for all of them."""

    def __init__(self, application: Callable[..., Any], seeder: _RegionSeeder) -> None:
        self._application = application
        self._seeder = seeder
        self.last_request = time.monotonic()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self.last_request = time.monotonic()
        if environ.get("PATH_INFO") == RESOURCES_PATH:
            body = json.dumps(held_resources()).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        self._seeder.seed_from_authorization(environ.get("HTTP_AUTHORIZATION"))
        return self._application(environ, start_response)


def held_resources() -> dict[str, list[str]]:
    """What the moto backends of this process hold, in every account and region:
    instances not terminated, key pairs, security groups other than a VPC's default."""
    from moto.backends import get_backend

    held: dict[str, list[str]] = {"instances": [], "key_pairs": [], "security_groups": []}
    for _account, regions in list(get_backend("ec2").items()):
        for region, backend in list(regions.items()):
            held["instances"] += [
                f"{region}/{instance.id}" for instance in backend.all_instances() if instance.state != "terminated"
            ]
            held["key_pairs"] += [f"{region}/{pair.key_name}" for pair in backend.describe_key_pairs([])]
            held["security_groups"] += [
                f"{region}/{group.id}" for group in backend.describe_security_groups() if group.name != "default"
            ]
    return held


def _records_this_process(record_path: Path) -> bool:
    try:
        return int(json.loads(record_path.read_text())["pid"]) == os.getpid()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _exit_when_idle(directory: Path, middleware: _SeedingMiddleware, idle_seconds: float, stop: Callable[[], None]) -> None:
    """The server's own backstop against being orphaned (its starter was killed, or
    every cluster was taken down by other invocations): once it has served no
    request for ``idle_seconds``, holds nothing and no process uses it, it removes
    its record -- under the start lock, so no caller is handed it meanwhile -- and stops."""
    record_path = directory / SERVER_RECORD_NAME
    said = ""

    def staying(reason: str) -> None:
        nonlocal said
        if reason != said:  # once per change, not once per check
            print(f"gpuflow sandbox: idle, staying: {reason}", flush=True)
            said = reason

    while True:
        time.sleep(min(5.0, idle_seconds / 4))
        if time.monotonic() - middleware.last_request < idle_seconds:
            continue
        with _try_flock(directory / SERVER_LOCK_NAME, fcntl.LOCK_EX) as not_starting:
            if not not_starting:
                continue  # a caller is being handed this server, or a server is starting
            with _try_flock(directory / SERVER_USERS_LOCK_NAME, fcntl.LOCK_EX) as unused:
                if not unused:
                    staying("in use by a gpuflow process")
                    continue
                recorded = _records_this_process(record_path)
                held = {kind: items for kind, items in held_resources().items() if items}
                if held and recorded:  # unrecorded, no new caller can find it: what it holds is lost anyway
                    staying("it holds " + ", ".join(f"{len(items)} {kind}" for kind, items in sorted(held.items())))
                    continue
                if recorded:
                    record_path.unlink(missing_ok=True)
        break
    print(f"gpuflow sandbox: idle for {idle_seconds:g} s and used by no one: exiting", flush=True)
    stop()


def serve(
    directory: Path,
    *,
    port: int = 0,
    regions: Iterable[str] = (DEFAULT_SANDBOX_REGION,),
    lock_fd: int | None = None,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
) -> None:
    """Run the sandbox server in this process until SIGTERM/SIGINT, or until it
    has been idle, empty and unused for ``idle_seconds``.

    Listens on 127.0.0.1 only (port 0: any free port), then records pid and
    port atomically in ``directory/server.json`` — the record appears only
    once the socket accepts connections — and only then closes ``lock_fd``
    (the start lock its starter holds, inherited).
    """
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the log
    seeder = _RegionSeeder(seed_deep_learning_ami)
    for region in regions:
        seeder.seed(region)
    middleware = _SeedingMiddleware(DomainDispatcherApplication(create_backend_app), seeder)
    server = make_server(LOOPBACK, port, middleware, threaded=True)
    record_path = Path(directory) / SERVER_RECORD_NAME

    def _stop(signal_number: int, _frame: Any) -> None:
        raise SystemExit(128 + signal_number)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    actual_port = server.server_address[1]
    atomic_write_json(record_path, {"pid": os.getpid(), "port": actual_port, "started_at": time.time()})
    if lock_fd is not None:
        os.close(lock_fd)  # recorded: callers waiting on the start lock now find this server
    print(f"gpuflow sandbox: moto listening on http://{LOOPBACK}:{actual_port} (pid {os.getpid()})", flush=True)
    threading.Thread(
        target=_exit_when_idle, args=(Path(directory), middleware, idle_seconds, server.shutdown), daemon=True
    ).start()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if _records_this_process(record_path):
            record_path.unlink(missing_ok=True)
        print("gpuflow sandbox: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.sandbox", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the sandbox moto server in the foreground")
    serve_parser.add_argument("--directory", type=Path, required=True, help="where server.json is written")
    serve_parser.add_argument("--port", type=int, default=0, help="loopback port (0: any free port)")
    serve_parser.add_argument(
        "--region", action="append", dest="regions", help="region to seed at start (repeatable; others on first use)"
    )
    serve_parser.add_argument("--lock-fd", type=int, help="inherited start lock, closed once the record is written")
    serve_parser.add_argument(
        "--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS,
        help="exit after this long without a request while holding nothing and used by no one",
    )
    arguments = parser.parse_args(argv)
    try:
        serve(
            arguments.directory,
            port=arguments.port,
            regions=arguments.regions or (DEFAULT_SANDBOX_REGION,),
            lock_fd=arguments.lock_fd,
            idle_seconds=arguments.idle_seconds,
        )
        code = 0
    except SystemExit as stop:  # SIGTERM/SIGINT
        code = stop.code if isinstance(stop.code, int) else 1
    # The record is gone and the socket closed: skip the interpreter's ~2 s teardown of moto.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
