"""`gpuflow notebook`: one Jupyter server per cluster node, on its loopback, with a fresh token, reached by a forward.

The node side is :mod:`gpuflow.tunnels.notebook_node` (sent after
:mod:`gpuflow.procs`' source as ``python -c``, run by the run environment's
interpreter): it starts the server detached in its own session (it outlives
the connection, as a run does) in the synced project directory, bound to
127.0.0.1, and records it by process identity; asked again, it answers with the
running server (reattach); ``stop`` ends its process group.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from gpuflow import procs
from gpuflow.errors import RemoteCommandFailed
from gpuflow.jobs.environment import base_python
from gpuflow.transport.base import CommandRunner

DEFAULT_PORT = 8888
_NODE_SOURCE = Path(__file__).with_name("notebook_node.py")


@dataclass(frozen=True)
class NotebookServer:
    """The Jupyter server on a node: its port there, its token, how it was found."""

    port: int
    token: str
    app: str
    pid: int
    work_dir: str
    lab: bool = False
    reattached: bool = False
    note: str | None = None

    def url(self, local_port: int) -> str:
        """The address to open here (through the forward), token included."""
        page = {"jupyterlab": "lab", "notebook": "tree"}.get(self.app, "")
        return f"http://127.0.0.1:{local_port}/{page}?token={self.token}"


def node_script() -> str:
    """:mod:`gpuflow.procs` (identity, proof) then the node side, as one ``python -c`` script."""
    procs_source = Path(procs.__file__).read_text(encoding="utf-8")
    return f"{procs_source}\n\n{_NODE_SOURCE.read_text(encoding='utf-8')}\n\nsys.exit(notebook_main(sys.argv[1:]))\n"


def _call(runner: CommandRunner, python: str, args: list[str], stdin: bytes | None = None) -> dict:
    result = runner.run([python, "-c", node_script(), *args], stdin=stdin, check=False, timeout=300)
    lines = result.text().strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise RemoteCommandFailed(f"the notebook helper on the node failed: {' | '.join(lines[-3:]) or 'no answer'}")
    if "error" in answer:
        raise RemoteCommandFailed(f"cannot start Jupyter on the node: {answer['error']}")
    return answer


def _server(answer: dict) -> NotebookServer:
    return NotebookServer(
        port=int(answer["port"]), token=str(answer["token"]), app=str(answer["app"]), pid=int(answer["pid"]),
        work_dir=str(answer["work_dir"]), lab=bool(answer.get("lab")), reattached=bool(answer.get("reattached")),
        note=answer.get("note"),
    )


def start_notebook(
    runner: CommandRunner, *, project_dir: Path, lab: bool = False, python: str | None = None
) -> NotebookServer:
    """The node's Jupyter server: the running one (reattached, whatever ``lab``), or a new one with a fresh token."""
    python = python or base_python(runner, project_dir)
    work_dir = f"{runner.base_dir}/project"  # where `gpuflow sync` puts the project
    token = secrets.token_hex(24)
    answer = _call(
        runner, python, ["start", runner.base_dir, work_dir, "lab" if lab else "notebook", str(DEFAULT_PORT)],
        stdin=token.encode(),
    )
    return _server(answer)


def stop_notebook(runner: CommandRunner, *, python: str | None = None) -> str:
    """Stop the node's Jupyter server: 'stopped', 'killed' (it ignored SIGTERM) or 'none' (none ran)."""
    return str(_call(runner, python or runner.python, ["stop", runner.base_dir])["stopped"])
