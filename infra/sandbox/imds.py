"""The sandbox instances' metadata service (IMDSv2), and simulated spot interruptions.

A real EC2 instance asks ``http://169.254.169.254`` who it is and whether it is
about to be reclaimed.  A sandbox instance (a directory and processes on this
machine) gets its own loopback IMDSv2 instead: one HTTP server per node, on
127.0.0.1 and a port of its own, hosted by the process that hosts the sandbox's
moto (the detached server of ``gpuflow up --sandbox``, or the in-process cloud of
``run --up --sandbox`` and of the pytest fixture).  Its URL is written to
``<node dir>/imds-endpoint`` (:data:`ENDPOINT_NAME`); the node's supervisor
exports it as ``$GPUFLOW_IMDS_ENDPOINT``, so the spot watcher and any sidecar
ask it exactly as they would ask EC2's.

It serves ``PUT /latest/api/token`` (the TTL header required, 1..21600 s) and,
with a valid token only (401 otherwise), under ``/latest/meta-data/``:
``instance-id``, ``instance-type``, ``placement/availability-zone``,
``spot/instance-action`` (404 until the node is interrupted),
``events/recommendations/rebalance`` (404), and, only when the instance was
launched with an instance profile, ``iam/security-credentials/`` (the role's
name) and ``iam/security-credentials/<role>`` (temporary credentials, which the
sandbox's moto accepts).

A simulated interruption is a control file, ``<node dir>/spot-interruption.json``
(:data:`CONTROL_NAME`, written by ``gpuflow sandbox interrupt`` from any
process): from then on the node's IMDS serves the notice
(``{"action": "terminate", "time": ...}``); once its time has come the
:class:`SandboxKeeper` of the hosting process ends the instance as EC2 would,
through the sandbox's one termination path
(:meth:`~infra.sandbox.provisioner.SandboxProvisioner.terminate`: its processes
killed and its directory deleted by ``discard_instance``, then
``TerminateInstances``), moto setting the state reason
``Server.SpotInstanceTermination`` in the same call.

Standard library only at module level; moto is imported by the keeper when it runs.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import math
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
ENDPOINT_NAME = "imds-endpoint"
CONTROL_NAME = "spot-interruption.json"
SPOT_REASON_CODE = "Server.SpotInstanceTermination"
SPOT_REASON_MESSAGE = "Server.SpotInstanceTermination: Spot instance termination"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
METADATA_PREFIX = "/latest/meta-data/"
MAX_TOKEN_TTL = 21600
CLUSTER_TAG = "gpuflow:cluster"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

DiscardInstance = Callable[[str, "str | None"], None]


def utc_text(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------- the control file


@dataclass(frozen=True)
class InterruptionRequest:
    """A simulated spot interruption of one node: the notice is served from
    ``requested_at`` on, the instance ends at ``terminate_at`` (epoch seconds)."""

    instance_id: str
    requested_at: float
    terminate_at: float
    action: str = "terminate"

    @property
    def notice(self) -> dict[str, str]:
        """What ``spot/instance-action`` answers, as EC2 writes it."""
        return {"action": self.action, "time": utc_text(self.terminate_at)}

    def to_json(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "action": self.action, "requested_at": self.requested_at,
                "terminate_at": self.terminate_at, "notice": self.notice}

    @classmethod
    def from_json(cls, document: Any) -> InterruptionRequest:
        if not isinstance(document, dict):
            raise ValueError("not an object")
        request = cls(instance_id=str(document["instance_id"]), requested_at=float(document["requested_at"]),
                      terminate_at=float(document["terminate_at"]), action=str(document.get("action", "terminate")))
        moments = (request.requested_at, request.terminate_at)
        if not all(math.isfinite(moment) and 0 <= moment < 4e9 for moment in moments) or moments[1] < moments[0]:
            raise ValueError("times out of range")
        if request.action not in ("terminate", "stop", "hibernate"):
            raise ValueError(f"unknown action {request.action!r}")
        return request


def read_request(node_dir: Path) -> InterruptionRequest | None:
    """The node's interruption request, or None (none, or a file that does not parse)."""
    try:
        return InterruptionRequest.from_json(json.loads((Path(node_dir) / CONTROL_NAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_request(node_dir: Path, request: InterruptionRequest) -> None:
    """Write the request atomically, once: a second one for the same node is refused (FileExistsError)."""
    path = Path(node_dir) / CONTROL_NAME
    temporary = path.with_name(f".{CONTROL_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    temporary.write_text(json.dumps(request.to_json()) + "\n")
    try:
        os.link(temporary, path)  # atomic, and fails when a request is there already
    finally:
        temporary.unlink(missing_ok=True)


def read_endpoint(node_dir: Path) -> str | None:
    try:
        text = (Path(node_dir) / ENDPOINT_NAME).read_text().strip()
    except OSError:
        return None
    return text if text.startswith(f"http://{LOOPBACK}:") else None


def endpoint_answers(endpoint: str, timeout: float = 2.0) -> bool:
    """Whether an IMDSv2 answers at ``endpoint`` (it hands out a token)."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(endpoint)
    connection = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port or 80, timeout=timeout)
    try:
        connection.request("PUT", TOKEN_PATH, headers={TOKEN_TTL_HEADER: "60"})
        response = connection.getresponse()
        return response.status == 200 and bool(response.read().strip())
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


# ---------------------------------------------------------------------- one node's IMDS


@dataclass(frozen=True)
class InstanceMetadata:
    """What one node's IMDS says about it."""

    instance_id: str
    instance_type: str
    availability_zone: str
    role: str | None = None  # the instance profile's role, None without a profile


class _Handler(http.server.BaseHTTPRequestHandler):
    server: MetadataServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.0"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: str | bytes = b"", content_type: str = "text/plain") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        if self.path != TOKEN_PATH:
            return self._answer(404)
        try:
            ttl = int(self.headers.get(TOKEN_TTL_HEADER, ""))
        except ValueError:
            return self._answer(400)
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            return self._answer(400)
        self._answer(200, self.server.new_token(ttl))

    def do_GET(self) -> None:  # noqa: N802
        if not self.server.token_valid(self.headers.get(TOKEN_HEADER)):
            return self._answer(401)
        answer = self.server.answer(self.path)
        if answer is None:
            return self._answer(404)
        self._answer(200, *answer)


class MetadataServer(http.server.ThreadingHTTPServer):
    """One node's IMDSv2 on 127.0.0.1 (a port of its own), served by a daemon thread."""

    daemon_threads = True

    def __init__(self, metadata: InstanceMetadata, node_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__((LOOPBACK, 0), _Handler)
        self.metadata = metadata
        self.node_dir = Path(node_dir)
        self._clock = clock
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        self._credentials: dict[str, str] | None = None
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"imds-{metadata.instance_id}")

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"

    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()

    def new_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = self._clock()
            self._tokens = {key: until for key, until in self._tokens.items() if until > now}
            self._tokens[token] = now + ttl
        return token

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and self._tokens.get(token, 0.0) > self._clock()

    def answer(self, path: str) -> tuple[str, str] | None:
        """(body, content type) for GET ``path``, None for 404."""
        if not path.startswith(METADATA_PREFIX):
            return None
        key = path[len(METADATA_PREFIX):]
        metadata = self.metadata
        plain = {
            "instance-id": metadata.instance_id,
            "instance-type": metadata.instance_type,
            "placement/availability-zone": metadata.availability_zone,
        }
        if key in plain:
            return plain[key], "text/plain"
        if key == "spot/instance-action":
            request = read_request(self.node_dir)
            if request is None:
                return None
            return json.dumps(request.notice), "application/json"
        if metadata.role is not None:
            if key in ("iam/security-credentials", "iam/security-credentials/"):
                return metadata.role, "text/plain"
            if key == f"iam/security-credentials/{metadata.role}":
                return json.dumps(self._role_credentials()), "application/json"
        return None  # events/recommendations/rebalance and anything else: 404

    def _role_credentials(self) -> dict[str, str]:
        """Temporary credentials of the instance's role, renewed an hour before they expire."""
        with self._lock:
            now = self._clock()
            expires = self._credentials and datetime.datetime.strptime(
                self._credentials["Expiration"], "%Y-%m-%dT%H:%M:%SZ"
            ).replace(tzinfo=datetime.timezone.utc).timestamp()
            if not self._credentials or not expires or expires - now < 3600:
                self._credentials = {
                    "Code": "Success",
                    "LastUpdated": utc_text(now),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
                    "SecretAccessKey": secrets.token_urlsafe(30),
                    "Token": secrets.token_urlsafe(96),
                    "Expiration": utc_text(now + 6 * 3600),
                }
            return dict(self._credentials)


# ---------------------------------------------------------------------- the keeper


def discard_by_command(command: Sequence[str]) -> DiscardInstance:
    """A ``discard_instance`` that runs ``command INSTANCE_ID CLUSTER`` (the sandbox
    server's: it imports nothing from gpuflow, so gpuflow hands it the command)."""

    def discard(instance_id: str, cluster: str | None) -> None:
        subprocess.run([*command, instance_id, cluster or ""], stdin=subprocess.DEVNULL, timeout=60, check=False)

    return discard


def _instances() -> list[tuple[Any, Any]]:
    """Every (ec2 backend, instance) moto holds in this process, in every account and region."""
    from moto.backends import get_backend

    found = []
    for _account, regions in list(get_backend("ec2").items()):
        for _region, backend in list(regions.items()):
            found += [(backend, instance) for instance in list(backend.all_instances())]
    return found


def _role_of(backend: Any, instance_id: str) -> str | None:
    association = getattr(backend, "iam_instance_profile_associations", {}).get(instance_id)
    profile = getattr(association, "iam_instance_profile", None)
    roles = list(getattr(profile, "roles", None) or [])
    return str(roles[0].name) if roles else None


def _cluster_of(instance: Any) -> str | None:
    for tag in instance.get_tags() if hasattr(instance, "get_tags") else []:
        if tag.get("key") == CLUSTER_TAG and _NAME.match(str(tag.get("value", ""))):
            return str(tag["value"])
    tags = getattr(instance, "tags", None)
    if isinstance(tags, dict):
        value = tags.get(CLUSTER_TAG)
        if value and _NAME.match(str(value)):
            return str(value)
    return None


def _spot_reason(instance: Any) -> None:
    from moto.ec2.models.instances import StateReason

    instance.state_reason = StateReason(SPOT_REASON_MESSAGE, SPOT_REASON_CODE)
    instance._reason = f"Service initiated ({utc_text(time.time()).replace('T', ' ').rstrip('Z')} GMT)"


def reclaimed_as_spot(instance: Any) -> None:
    """Make moto's own termination of ``instance`` (whoever asks for it next) a spot
    reclaim's: the spot state reason is set with the state, in the same call, so no
    reader ever sees the instance terminated with a user-initiated reason."""
    original = instance.terminate

    def terminate() -> Any:
        previous = original()
        _spot_reason(instance)
        return previous

    instance.terminate = terminate


def spot_terminate(backend: Any, instance: Any) -> None:
    """Terminate ``instance`` in moto as a spot reclaim does: state ``terminated``, state
    reason ``Server.SpotInstanceTermination`` (moto's own terminate sets a user-initiated one)."""
    if instance.state != "terminated":
        reclaimed_as_spot(instance)
        backend.terminate_instances([instance.id])
    _spot_reason(instance)


class SandboxKeeper:
    """The hosting process's side of the sandbox's instances: starts an IMDS for
    each live gpuflow instance whose directory exists under ``sandbox_root``
    (``<root>/<cluster>/<instance-id>``), and carries out due interruptions."""

    def __init__(
        self,
        sandbox_root: Path,
        discard_instance: DiscardInstance,
        *,
        endpoint_url: str | None = None,
        interval: float = 0.05,
    ) -> None:
        self.sandbox_root = Path(sandbox_root)  # <home>/sandbox
        self.discard_instance = discard_instance
        self.endpoint_url = endpoint_url  # this process's moto server; None: moto is in-process
        self.interval = interval
        self.servers: dict[str, MetadataServer] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpuflow-sandbox-keeper")

    def start(self) -> SandboxKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        for server in list(self.servers.values()):
            server.close()
        self.servers.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # moto mid-change, a directory going: the next pass sees it
                self.step()
            self._stop.wait(self.interval)

    def step(self) -> None:
        """One pass over moto's instances and their directories."""
        seen = set()
        for backend, instance in _instances():
            cluster = _cluster_of(instance)
            if cluster is None or instance.state in ("terminated", "shutting-down") or not _NAME.match(instance.id):
                continue
            seen.add(instance.id)
            node_dir = self.sandbox_root / cluster / instance.id
            server = self.servers.get(instance.id)
            if server is None:
                if not node_dir.is_dir():
                    continue  # not reached yet: gpuflow makes its directory when it first reaches it
                server = self._boot(backend, instance, node_dir)
            request = read_request(node_dir)
            if request is not None and request.instance_id == instance.id and time.time() >= request.terminate_at:
                self._reclaim(backend, instance, cluster)
                seen.discard(instance.id)
        for instance_id in [key for key in self.servers if key not in seen]:
            self.servers.pop(instance_id).close()

    def _boot(self, backend: Any, instance: Any, node_dir: Path) -> MetadataServer:
        placement = getattr(instance, "placement", None) or getattr(instance, "_placement", None)
        zone = str(getattr(placement, "zone", None) or placement or "")
        metadata = InstanceMetadata(instance.id, str(instance.instance_type), zone, _role_of(backend, instance.id))
        server = MetadataServer(metadata, node_dir).start()
        self.servers[instance.id] = server
        path = node_dir / ENDPOINT_NAME
        temporary = node_dir / f".{ENDPOINT_NAME}.{os.getpid()}"
        try:
            temporary.write_text(server.endpoint + "\n")
            os.replace(temporary, path)
        except OSError:  # the directory went meanwhile (the instance is being terminated)
            temporary.unlink(missing_ok=True)
        return server

    def _reclaim(self, backend: Any, instance: Any, cluster: str) -> None:
        """The spot reclaim, through the sandbox's one termination path
        (:meth:`~infra.sandbox.provisioner.SandboxProvisioner.terminate`: the node's processes
        and directory first, then ``TerminateInstances``), then the spot state reason."""
        from infra.aws.client import AwsApi, AwsTarget
        from infra.sandbox.provisioner import SandboxProvisioner

        server = self.servers.pop(instance.id, None)
        if server is not None:
            server.close()
        target = AwsTarget(region=backend.region_name, profile=None, endpoint_url=self.endpoint_url, sandbox=True)
        provisioner = SandboxProvisioner(
            AwsApi(target), discard_instance=self.discard_instance, poll_seconds=0.05, timeout_seconds=60
        )
        reclaimed_as_spot(instance)
        provisioner.terminate([instance.id])
        spot_terminate(backend, instance)  # (already done: only when the API call did not reach moto)


__all__ = [
    "CONTROL_NAME",
    "ENDPOINT_NAME",
    "SPOT_REASON_CODE",
    "InstanceMetadata",
    "InterruptionRequest",
    "MetadataServer",
    "SandboxKeeper",
    "discard_by_command",
    "endpoint_answers",
    "read_endpoint",
    "read_request",
    "spot_terminate",
    "write_request",
]
