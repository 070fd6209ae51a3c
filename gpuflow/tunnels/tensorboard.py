"""`gpuflow tensorboard RUN | NAME`: the training modules' TensorBoard logs, served where they are.

* a run whose cluster still runs: TensorBoard runs on the node (the run
  environment's Python) over ``<run>/outputs/tensorboard``, as the remote
  command of the forward's SSH session, on a terminal: the hang-up of a closed
  connection ends it, a reconnection starts it again;
* a cluster NAME: the same over every run on it (``~/gpuflow/runs``);
* a run whose cluster is gone (``down``, the dead-man's switch), or a sandbox
  node without sshd (this machine): TensorBoard here, over the pulled copy
  (``runs/RUN_ID/outputs/tensorboard``) or the sandbox directory.

It listens on 127.0.0.1 only, on 6006 or the next free port.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpuflow import nodes
from gpuflow.errors import RemoteCommandFailed, UnreachableHost, UsageError
from gpuflow.jobs.environment import base_python
from gpuflow.nodes import CloudProbe
from gpuflow.records import Cluster
from gpuflow.transport.base import CommandRunner
from gpuflow.tunnels.forward import PORT_TAKEN_TRIES, end_with_parent, hold_forwards, plan_forward
from gpuflow.tunnels.ports import LOOPBACK, Forward, next_free_port
from gpuflow.tunnels.registry import TunnelKind

DEFAULT_PORT = 6006
TENSORBOARD_DIR = "tensorboard"  # under a run's outputs/ (training.callbacks.TENSORBOARD_DIR)
READY_SECONDS = 120


def tensorboard_argv(python: str, logdir: str, port: int) -> list[str]:
    # --load_fast=false: one process (no separate data server) that the session's hang-up ends.
    return [
        python, "-m", "tensorboard.main", "--logdir", logdir, "--host", LOOPBACK, "--port", str(int(port)),
        "--load_fast=false",
    ]


def require_local_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError(
            "TensorBoard is not installed here", hint="pip install tensorboard (or pip install 'gpuflow[tensorboard]')"
        )


def serves(url: str, logdir: str) -> bool:
    """Whether the server at ``url`` is TensorBoard over ``logdir``: its environment
    says so (another program that took the port, HTTP or not, is not)."""
    try:
        with urllib.request.urlopen(url + "data/environment", timeout=2) as response:
            environment = json.loads(response.read(1 << 20))
    except (OSError, ValueError):  # refused, no answer in time, an error status, not JSON
        return False
    return isinstance(environment, dict) and environment.get("data_location") == logdir


class ServerPortTaken(RemoteCommandFailed):
    """TensorBoard ended because another process took its port after it was chosen."""


def wait_until_answering(
    url: str, logdir: str, alive: Callable[[], str | None], seconds: float = READY_SECONDS
) -> None:
    """Until TensorBoard over ``logdir`` answers at ``url``; ``alive()`` says why the
    server ended (then it is an error: :class:`ServerPortTaken` when its port was another's)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reason = alive()
        if reason is not None:
            error = ServerPortTaken if "already in use" in reason else RemoteCommandFailed
            raise error(f"TensorBoard ended: {reason}")
        if serves(url, logdir):
            return
        time.sleep(0.2)
    raise RemoteCommandFailed(f"TensorBoard did not answer within {seconds:.0f} s")


@dataclass
class LocalTensorBoard:
    """TensorBoard on this machine, in its own process group."""

    logdir: Path
    forward: Forward  # remote == local: no tunnel
    say: Callable[[str], None] = lambda line: None

    def __post_init__(self) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Serve; a port another process took after it was chosen moves to the next free one (said)."""
        require_local_tensorboard()
        for attempt in range(1, PORT_TAKEN_TRIES + 1):
            self._stderr.seek(0)
            self._stderr.truncate()
            self.process = subprocess.Popen(
                tensorboard_argv(sys.executable, str(self.logdir), self.forward.local),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True,
                preexec_fn=end_with_parent,
            )
            try:
                wait_until_answering(self.forward.url, str(self.logdir), self.ended)
                return
            except ServerPortTaken:
                self.stop()
                if attempt == PORT_TAKEN_TRIES:
                    raise
                port = next_free_port(self.forward.local + 1)
                self.say(f"local port {self.forward.local} was taken meanwhile: using {port}")
                self.forward = Forward(port, port)

    def ended(self) -> str | None:
        if self.process is None or self.process.poll() is None:
            return None
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {self.process.returncode}"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def hold_local(server: LocalTensorBoard, *, on_ready: Callable[[], None], poll_seconds: float = 0.2) -> None:
    """Serve until Ctrl-C / SIGTERM (a normal end) or until TensorBoard itself ends (an error)."""
    try:
        server.start()
        on_ready()
        while True:
            reason = server.ended()
            if reason is not None:
                raise RemoteCommandFailed(f"TensorBoard ended: {reason}")
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        return
    finally:
        server.stop()


def remote_logdir(base_dir: str, run_remote_dir: str | None) -> str:
    """A run's logs on the node, or every run's (TensorBoard finds each run's event files below)."""
    return f"{run_remote_dir}/outputs/{TENSORBOARD_DIR}" if run_remote_dir else f"{base_dir}/runs"


def local_logdir(local_dir: str) -> Path:
    """A pulled run's logs: ``runs/RUN_ID/outputs/tensorboard``."""
    path = Path(local_dir) / "outputs" / TENSORBOARD_DIR
    if not path.is_dir():
        raise UsageError(
            f"no TensorBoard logs in {path}",
            hint="pull the run first (`gpuflow pull RUN`); runs started with --no-tensorboard write none",
        )
    return path


def serve_argv(python: str, logdir: str, port: int) -> Sequence[str]:
    return tensorboard_argv(python, logdir, port)


def serve_from_node(
    cluster: Cluster,
    local_port: int,
    run_remote_dir: str | None,
    *,
    probe: CloudProbe | None,
    project_dir: Path,
    say: Callable[[str], None],
    on_ready: Callable[[str], None],
) -> None:
    """TensorBoard on the cluster's head node over a run's logs (``run_remote_dir``; None: every
    run's), run by the forward's SSH session on a free port of the node from 6006, until Ctrl-C;
    ``on_ready(url)`` once it answers here.  A node port another process took after it was found
    free moves to the next free one (said in one line)."""
    runner = nodes.runner_for(cluster, probe=probe, project_dir=project_dir)
    try:
        python = base_python(runner, project_dir)
        logdir = remote_logdir(runner.base_dir, run_remote_dir)
        remote_port = _free_node_port(runner, cluster.name, python, DEFAULT_PORT, local_port)
    finally:
        runner.close()

    def ready(tunnel) -> None:  # noqa: ANN001 - a gpuflow.tunnels.forward.Tunnel
        url = tunnel.forwards[0].url
        wait_until_answering(url, logdir, tunnel.ended)
        on_ready(url)

    for attempt in range(1, PORT_TAKEN_TRIES + 1):
        plan = plan_forward(
            cluster, [Forward(remote_port, local_port)], probe=probe, project_dir=project_dir,
            serve=tensorboard_argv(python, logdir, remote_port),
        )
        try:
            hold_forwards(cluster, plan, say=say, on_ready=ready, kind=TunnelKind.TENSORBOARD, url=lambda held: held[0].url)
            return
        except ServerPortTaken:
            if attempt == PORT_TAKEN_TRIES:
                raise
            runner = nodes.runner_for(cluster, probe=probe, project_dir=project_dir)
            try:
                taken, remote_port = remote_port, _free_node_port(runner, cluster.name, python, remote_port + 1, local_port)
            finally:
                runner.close()
            say(f"port {taken} on {cluster.name} was taken meanwhile: using {remote_port}")


_FREE_PORT_SCRIPT = """
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[1]) + 100):
    if str(port) == sys.argv[2]:  # the local end's port: the same machine when the node is this one (sandbox)
        continue
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        probe.close()
    print(port)
    break
"""


def _free_node_port(runner: CommandRunner, name: str, python: str, start: int, avoid: int) -> int:
    """The first free port from ``start`` on the node's 127.0.0.1 (never ``avoid``: the local end's,
    the same machine when the node is this one: a sandbox)."""
    found = runner.run([python, "-c", _FREE_PORT_SCRIPT, str(start), str(avoid)], check=False).text().split()
    if not found or not found[-1].isdigit():
        raise UnreachableHost(f"no free port on {name} from {start}")
    return int(found[-1])
