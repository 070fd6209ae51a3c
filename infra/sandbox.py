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


def sandbox_endpoint(home: Path, *, startup_timeout: float = 30.0) -> str:
    """The URL of this gpuflow home's sandbox EC2/SSM API, starting it if needed.

    The server is a detached process (its own session, so Ctrl-C in the CLI
    does not kill it) listening on 127.0.0.1 only; boto3 clients use the URL
    as ``endpoint_url``.  A live server is reused, so fake clusters made by
    one ``gpuflow`` invocation are there for the next.  Concurrent callers
    serialise on a lock and get the same server.
    """
    directory = server_directory(home)
    with _locked(directory / SERVER_LOCK_NAME):
        record = read_server_record(home)
        if record is not None and _server_is_alive(record):
            return record.url
        if record is not None:
            _terminate_server(record)
            _remove_record(directory)
        return _start_server(directory, startup_timeout).url


def stop_sandbox(home: Path, *, timeout: float = 10.0) -> bool:
    """Stop this home's sandbox server; all fake cloud state goes with it.

    Returns whether a server was running.  Idempotent.
    """
    directory = server_directory(home)
    with _locked(directory / SERVER_LOCK_NAME):
        record = read_server_record(home)
        if record is None:
            return False
        was_running = _terminate_server(record, timeout=timeout)
        _remove_record(directory)
        return was_running


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
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


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


def _server_is_alive(record: SandboxServer) -> bool:
    return _is_our_server_process(record.pid) and _health_check(record.port)


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
    re-checked here: an exiting process's cmdline reads empty before it dies."""
    _reap(pid)
    if not process_alive(pid):
        return True
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    return False


def _reap(pid: int) -> None:
    """Collect the exit status when the server is our own child (tests, or a
    long-lived caller that started it), so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _start_server(directory: Path, startup_timeout: float) -> SandboxServer:
    log_path = directory / SERVER_LOG_NAME
    # The child must import this package even when gpuflow is not installed
    # (a source checkout): put the checkout first on its path.
    source_root = str(Path(__file__).resolve().parent.parent)
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("AWS_")
    }  # the fake cloud needs no credentials; keep real ones out of its environment
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, environment.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", _SERVE_MARKER, "serve", "--directory", str(directory)]
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
        )
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
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()
    raise CloudError(
        f"the sandbox cloud (a local moto server) did not answer within {startup_timeout:g} s",
        hint=f"see {log_path}",
    )


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

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self._seeder.seed_from_authorization(environ.get("HTTP_AUTHORIZATION"))
        return self._application(environ, start_response)


def serve(directory: Path, *, port: int = 0, regions: Iterable[str] = (DEFAULT_SANDBOX_REGION,)) -> None:
    """Run the sandbox server in this process until SIGTERM/SIGINT.

    Listens on 127.0.0.1 only (port 0: any free port), then records pid and
    port atomically in ``directory/server.json`` — the record appears only
    once the socket accepts connections.
    """
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the log
    seeder = _RegionSeeder(seed_deep_learning_ami)
    for region in regions:
        seeder.seed(region)
    application = _SeedingMiddleware(DomainDispatcherApplication(create_backend_app), seeder)
    server = make_server(LOOPBACK, port, application, threaded=True)
    record_path = Path(directory) / SERVER_RECORD_NAME

    def _stop(signal_number: int, _frame: Any) -> None:
        raise SystemExit(128 + signal_number)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    actual_port = server.server_address[1]
    atomic_write_json(record_path, {"pid": os.getpid(), "port": actual_port, "started_at": time.time()})
    print(f"gpuflow sandbox: moto listening on http://{LOOPBACK}:{actual_port} (pid {os.getpid()})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(record_path.read_text())["pid"] == os.getpid():
                record_path.unlink()
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
    arguments = parser.parse_args(argv)
    serve(arguments.directory, port=arguments.port, regions=arguments.regions or (DEFAULT_SANDBOX_REGION,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
