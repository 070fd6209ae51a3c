"""The sandbox cloud: the EC2 API is moto, "the instance" is this machine.

``gpuflow --sandbox`` runs the real ``infra/`` provisioning code against moto,
so a user (or their CI) can exercise the whole workflow with no AWS account.
Two shapes:

* :func:`in_process_sandbox` — ``moto.mock_aws()`` plus seeding, for one
  process that does everything (``gpuflow demo``, ``run --up ... --down``).
* :func:`sandbox_endpoint` — a detached moto server on 127.0.0.1 that keeps
  the fake EC2 state across separate CLI invocations (``up`` now, ``down``
  later); boto3 clients point ``endpoint_url`` at it.

Its rooms: :mod:`~infra.sandbox.seed` (what moto lacks, and the in-process
shape), :mod:`~infra.sandbox.server` (the detached server's life, from the
CLI's side), :mod:`~infra.sandbox.serve` (the server process,
``python -m infra.sandbox serve``), :mod:`~infra.sandbox.provisioner` (the
provisioner that terminates sandbox instances as EC2 would),
:mod:`~infra.sandbox.imds` (each instance's loopback IMDSv2 and simulated spot
interruptions, hosted by whichever process hosts moto).

moto is imported inside functions only: the CLI imports this package lazily,
and ``gpuflow --help`` must not pay for moto (~0.4 s).
"""

from __future__ import annotations

from infra.sandbox.seed import DEFAULT_SANDBOX_REGION, in_process_sandbox, seed_deep_learning_ami
from infra.sandbox.server import (
    DEFAULT_IDLE_SECONDS,
    ENV_IDLE_SECONDS,
    LOOPBACK,
    RESOURCES_PATH,
    SERVER_DIRECTORY_NAME,
    SERVER_LOCK_NAME,
    SERVER_LOG_NAME,
    SERVER_RECORD_NAME,
    SERVER_USERS_LOCK_NAME,
    SandboxServer,
    read_server_record,
    release_started_servers,
    sandbox_endpoint,
    server_directory,
    server_holdings,
    stop_sandbox,
)

__all__ = [
    "DEFAULT_IDLE_SECONDS",
    "DEFAULT_SANDBOX_REGION",
    "ENV_IDLE_SECONDS",
    "LOOPBACK",
    "RESOURCES_PATH",
    "SERVER_DIRECTORY_NAME",
    "SERVER_LOCK_NAME",
    "SERVER_LOG_NAME",
    "SERVER_RECORD_NAME",
    "SERVER_USERS_LOCK_NAME",
    "SandboxServer",
    "in_process_sandbox",
    "read_server_record",
    "release_started_servers",
    "sandbox_endpoint",
    "seed_deep_learning_ami",
    "server_directory",
    "server_holdings",
    "stop_sandbox",
]
