"""The sandbox server process: moto's EC2/SSM on loopback, seeding regions as they are named, exiting when idle.

Run as ``python -m infra.sandbox serve`` by :func:`infra.sandbox.server.sandbox_endpoint`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from infra.common import atomic_write_json
from infra.sandbox.fleet import faithful_instant_fleets
from infra.sandbox.seed import DEFAULT_SANDBOX_REGION, RegionSeeder, seed_deep_learning_ami, seeded_spot_price_history
from infra.sandbox.server import (
    DEFAULT_IDLE_SECONDS,
    LOOPBACK,
    RESOURCES_PATH,
    SERVER_LOCK_NAME,
    SERVER_RECORD_NAME,
    SERVER_USERS_LOCK_NAME,
    try_flock,
)


class _SeedingMiddleware:
    """WSGI wrapper: seeds the Deep Learning AMI into a region the first time
    a request for that region arrives (read from the SigV4 credential scope),
    so ``gpuflow up --region R --sandbox`` resolves the AMI in any region
    without paying ~0.1 s per region up front for all of them."""

    def __init__(self, application: Callable[..., Any], seeder: RegionSeeder) -> None:
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
    instances not terminated, key pairs, security groups other than a VPC's default,
    and CloudFormation stacks (the account stack of ``gpuflow setup --sandbox``)."""
    from moto.backends import get_backend

    held: dict[str, list[str]] = {"instances": [], "key_pairs": [], "security_groups": [], "stacks": []}
    for _account, regions in list(get_backend("ec2").items()):
        for region, backend in list(regions.items()):
            held["instances"] += [
                f"{region}/{instance.id}" for instance in backend.all_instances() if instance.state != "terminated"
            ]
            held["key_pairs"] += [f"{region}/{pair.key_name}" for pair in backend.describe_key_pairs([])]
            held["security_groups"] += [
                f"{region}/{group.id}" for group in backend.describe_security_groups() if group.name != "default"
            ]
    # A stack exists only if the server has served CloudFormation, which imported its backend;
    # importing it just to look takes seconds (longer than a caller waits for this answer).
    if "moto.cloudformation.models" not in sys.modules:
        return held
    for _account, regions in list(get_backend("cloudformation").items()):
        for region, backend in list(regions.items()):
            held["stacks"] += [f"{region}/{stack.name}" for stack in list(backend.stacks.values())
                               if stack.status != "DELETE_COMPLETE"]
    return held


def _records_this_process(record_path: Path) -> bool:
    try:
        return int(json.loads(record_path.read_text())["pid"]) == os.getpid()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _exit_when_idle(directory: Path, middleware: _SeedingMiddleware, idle_seconds: float, stop: Callable[[], None]) -> None:
    """The server's own backstop against being orphaned: it always ends.  Once it has
    served no request for ``idle_seconds`` it exits if its record is gone (its directory
    deleted, or the record no longer names it: nobody can find it any more), or if it
    holds nothing and no process uses it -- then removing its record under the start
    lock, so no caller is handed it meanwhile.  Any failure of this watcher stops the
    server too (one line in its log): a server without its watcher would never end."""
    try:
        reason = _wait_until_unneeded(directory, middleware, idle_seconds)
    except Exception as failure:  # noqa: BLE001 -- whatever it is, the server must not outlive its watcher
        reason = f"its idle watcher failed ({type(failure).__name__}: {failure}): stopping"
    print(f"gpuflow sandbox: {reason}", flush=True)
    stop()


def _wait_until_unneeded(directory: Path, middleware: _SeedingMiddleware, idle_seconds: float) -> str:
    """Block until the server may end; return why, for its log."""
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
        if not _records_this_process(record_path):  # no caller can find it; its lock files may be gone too
            return f"idle for {idle_seconds:g} s and its record is gone: exiting"
        with try_flock(directory / SERVER_LOCK_NAME, fcntl.LOCK_EX) as not_starting:
            if not not_starting:
                continue  # a caller is being handed this server, or a server is starting
            with try_flock(directory / SERVER_USERS_LOCK_NAME, fcntl.LOCK_EX) as unused:
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
                return f"idle for {idle_seconds:g} s and used by no one: exiting"


def serve(
    directory: Path,
    *,
    port: int = 0,
    regions: Iterable[str] = (DEFAULT_SANDBOX_REGION,),
    lock_fd: int | None = None,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
    discard_command: list[str] | None = None,
) -> None:
    """Run the sandbox server in this process until SIGTERM/SIGINT, or until it
    has been idle, empty and unused for ``idle_seconds``.

    Listens on 127.0.0.1 only (port 0: any free port), then records pid and
    port atomically in ``directory/server.json`` — the record appears only
    once the socket accepts connections — and only then closes ``lock_fd``
    (the start lock its starter holds, inherited).

    With ``discard_command`` (how gpuflow ends a sandbox instance's processes and
    directory: ``COMMAND INSTANCE_ID CLUSTER``) it also hosts each instance's IMDS
    and carries out simulated interruptions (:class:`infra.sandbox.imds.SandboxKeeper`).
    """
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the log
    seeder = RegionSeeder(seed_deep_learning_ami)
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
    keeper = None
    if discard_command:
        from infra.sandbox.imds import SandboxKeeper, discard_by_command

        keeper = SandboxKeeper(
            Path(directory).parent, discard_by_command(discard_command), endpoint_url=f"http://{LOOPBACK}:{actual_port}"
        )
    try:
        with seeded_spot_price_history(), faithful_instant_fleets():
            if keeper is not None:
                keeper.start()
            server.serve_forever()
    finally:
        if keeper is not None:
            keeper.stop()
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
    serve_parser.add_argument(
        "--discard-command", type=json.loads, default=None,
        help="JSON argv that ends a sandbox instance's processes and directory (+ INSTANCE_ID CLUSTER)",
    )
    arguments = parser.parse_args(argv)
    try:
        serve(
            arguments.directory,
            port=arguments.port,
            regions=arguments.regions or (DEFAULT_SANDBOX_REGION,),
            lock_fd=arguments.lock_fd,
            idle_seconds=arguments.idle_seconds,
            discard_command=[str(word) for word in arguments.discard_command or []] or None,
        )
        code = 0
    except SystemExit as stop:  # SIGTERM/SIGINT
        code = stop.code if isinstance(stop.code, int) else 1
    # The record is gone and the socket closed: skip the interpreter's ~2 s teardown of moto.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

