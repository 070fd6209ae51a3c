"""gpuflow CLI: `gpuflow forward`, `gpuflow notebook`, `gpuflow tensorboard` (thin: the work is in gpuflow.tunnels)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from gpuflow.cli._app import app
from gpuflow.config import find_project_root
from gpuflow.errors import ClusterNotFound, GpuflowError, RunNotFound


def _cluster(name: str):  # noqa: ANN202 - a Cluster; its module is imported with the use cases
    from gpuflow import clusters

    project = find_project_root()  # whose config says how a sandbox cluster is reached
    try:
        return clusters.get_cluster(name, project_dir=project), project
    except ClusterNotFound as exc:
        raise clusters.explain_unknown(name, exc, project_dir=project) from exc


@app.command("forward")
def forward(
    name: str = typer.Argument(..., help="The cluster to reach."),
    ports: list[str] = typer.Argument(  # noqa: B008
        ..., metavar="PORTS...",
        help="REMOTE_PORT[:LOCAL_PORT]: the node's port (on its 127.0.0.1), and this machine's port for it (default: the same number).",
    ),
    node: Optional[str] = typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        None, "--node", metavar="INSTANCE_ID", help="Reach this instance instead of the head node."
    ),
    trust_on_first_use: bool = typer.Option(
        False,
        "--trust-on-first-use",
        help="Accept and pin the host key the instance presents when its console shows none (warns).",
    ),
) -> None:
    """Forward a node's ports to 127.0.0.1 here, until Ctrl-C.

    Through the cluster's pinned SSH connection: no port is opened in the
    security group, and the local ports listen on 127.0.0.1 only. A taken local
    port becomes the next free one. A dropped connection is reopened.
    """
    from gpuflow import clusters, nodes
    from gpuflow.tunnels.forward import hold_forwards, plan_forward
    from gpuflow.tunnels.ports import choose_forwards, parse_port_spec

    specs = [parse_port_spec(spec) for spec in ports]
    cluster, project = _cluster(name)
    nodes.select_node(cluster, node)  # an unknown --node is the one error, before any local port is chosen

    def say(line: str) -> None:
        typer.echo(line, err=True)

    forwards = choose_forwards(specs, say=say)
    plan = plan_forward(
        cluster, forwards, instance_id=node, trust_on_first_use=trust_on_first_use, probe=clusters.cloud_probe(),
        project_dir=project,
    )
    shown: list[bool] = []

    def ready(tunnel) -> None:  # noqa: ANN001 - a gpuflow.tunnels.forward.Tunnel
        if shown:
            return
        shown.append(True)
        for item in tunnel.forwards:  # the ports that listen (one taken meanwhile moved on)
            typer.echo(f"{item.url} -> port {item.remote} on {plan.describe}")
        typer.echo("forwarding (127.0.0.1 only; Ctrl-C ends it)", err=True)

    hold_forwards(cluster, plan, say=say, on_ready=ready)
    typer.echo("forward ended", err=True)


def _open_browser(url: str) -> None:
    """Open ``url`` when a person is at a desktop: a terminal, a display, not CI (never in tests)."""
    import os
    import sys

    if os.environ.get("CI") or os.environ.get("GPUFLOW_NO_BROWSER") or not sys.stdout.isatty():
        return
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return
    import webbrowser

    try:
        webbrowser.open(url)
    except webbrowser.Error:
        pass


@app.command("notebook")
def notebook(
    name: str = typer.Argument(..., help="The cluster to run Jupyter on."),
    lab: bool = typer.Option(False, "--lab", help="JupyterLab instead of the classic notebook UI."),
    stop: bool = typer.Option(False, "--stop", help="Stop the cluster's Jupyter server."),
    port: Optional[int] = typer.Option(  # noqa: UP007
        None, "--port", min=1, max=65535, help="The local port to forward from (default 8888, else the next free one)."
    ),
    node: Optional[str] = typer.Option(  # noqa: UP007
        None, "--node", metavar="INSTANCE_ID", help="This instance instead of the head node."
    ),
    trust_on_first_use: bool = typer.Option(
        False,
        "--trust-on-first-use",
        help="Accept and pin the host key the instance presents when its console shows none (warns).",
    ),
) -> None:
    """Run Jupyter on a cluster and open it here.

    It is reached through SSH until Ctrl-C. The server listens on the instance's 127.0.0.1 with a fresh token, in the
    synced project directory, and keeps running after Ctrl-C or a dropped
    connection: running the command again reattaches to it; --stop stops it.
    No port is opened in the security group.
    """
    from gpuflow import clusters, nodes
    from gpuflow.tunnels.forward import hold_forwards, plan_forward
    from gpuflow.tunnels.notebook import DEFAULT_PORT, start_notebook, stop_notebook
    from gpuflow.tunnels.ports import PortSpec, choose_forwards
    from gpuflow.tunnels.registry import TunnelKind

    cluster, project = _cluster(name)
    probe = clusters.cloud_probe()
    runner = nodes.runner_for(
        cluster, nodes.select_node(cluster, node), trust_on_first_use=trust_on_first_use, probe=probe,
        project_dir=project,
    )
    try:
        if stop:
            outcome = stop_notebook(runner)
            typer.echo(
                f"no Jupyter server runs on {name}" if outcome == "none" else f"Jupyter server on {name} {outcome}"
            )
            return
        server = start_notebook(runner, project_dir=project, lab=lab)
    finally:
        runner.close()

    def say(line: str) -> None:
        typer.echo(line, err=True)

    if server.note:
        say(server.note)
    if server.reattached:
        say(f"reattached to the Jupyter server on {name} (pid {server.pid}, in {server.work_dir})")
    else:
        say(f"started Jupyter ({server.app}) on {name}'s 127.0.0.1:{server.port} (pid {server.pid}, in {server.work_dir})")
    forwards = choose_forwards([PortSpec(server.port, port or DEFAULT_PORT)], say=say)
    plan = plan_forward(
        cluster, forwards, instance_id=node, trust_on_first_use=trust_on_first_use, probe=probe, project_dir=project
    )
    shown: list[bool] = []

    def ready(tunnel) -> None:  # noqa: ANN001 - a gpuflow.tunnels.forward.Tunnel
        if shown:
            return
        shown.append(True)
        url = server.url(tunnel.forwards[0].local)
        typer.echo(url)
        say("Ctrl-C closes the tunnel; the server keeps running (`gpuflow notebook NAME --stop` stops it)")
        _open_browser(url)

    hold_forwards(
        cluster, plan, say=say, on_ready=ready, kind=TunnelKind.NOTEBOOK, url=lambda held: server.url(held[0].local)
    )
    say(f"tunnel closed; Jupyter still runs on {name}: `gpuflow notebook {name}` reattaches, `--stop` stops it")


@app.command("tensorboard")
def tensorboard(
    target: str = typer.Argument(..., metavar="RUN_OR_NAME", help="A run id (see `gpuflow runs`) or a cluster."),
    port: Optional[int] = typer.Option(  # noqa: UP007
        None, "--port", min=1, max=65535, help="The local port (default 6006, else the next free one)."
    ),
) -> None:
    """Serve the TensorBoard logs of a run or a cluster.

    A cluster's: every run on it. While the cluster runs, TensorBoard runs on the instance and is reached
    through SSH (no port is opened); once it is gone, the pulled copy of the
    run is served here. Ctrl-C ends it.
    """
    from gpuflow import clusters, jobs, nodes
    from gpuflow.tunnels import tensorboard as board
    from gpuflow.tunnels.ports import PortSpec, choose_forwards
    from gpuflow.tunnels.registry import TunnelKind, registered

    def say(line: str) -> None:
        typer.echo(line, err=True)

    try:
        record = jobs.load_record(target)
    except RunNotFound:
        record = None
    project = find_project_root()
    probe = clusters.cloud_probe()
    try:
        cluster = clusters.get_cluster(record.cluster if record else target, project_dir=project)
    except ClusterNotFound as exc:
        if record is None:
            raise clusters.explain_unknown(target, exc, project_dir=project) from exc
        cluster = None
    try:
        alive = cluster is not None and nodes.node_alive(cluster, None, probe, project_dir=project)
    except GpuflowError:
        alive = True  # the cloud cannot say: try the node
    shown: list[bool] = []

    def show(url: str) -> None:
        if not shown:
            shown.append(True)
            typer.echo(url)
            say("serving TensorBoard (127.0.0.1 only; Ctrl-C ends it)")

    local_dir: Path | None = None
    if not alive:
        assert record is not None
        say(f"the cluster of run {record.run_id} is gone: serving its pulled copy")
        local_dir = board.local_logdir(record.local_dir)
    elif nodes.access_for(cluster, project_dir=project).reach is nodes.Reach.DIRECTORY:
        base = nodes.sandbox_directory(cluster)  # a sandbox node without sshd is this machine
        local_dir = Path(board.remote_logdir(str(base), record.remote_dir if record else None))
    if local_dir is not None:
        board.require_local_tensorboard()
        [forward] = choose_forwards([PortSpec(board.DEFAULT_PORT, port or board.DEFAULT_PORT)], say=say)
        server = board.LocalTensorBoard(local_dir, forward, say=say)
        with contextlib.ExitStack() as held:

            def serving() -> None:  # recorded for `gpuflow status` with the port it listens on
                served = server.forward
                held.enter_context(registered(
                    cluster.name if cluster else "-", "local", TunnelKind.TENSORBOARD, [served], served.url
                ))
                show(served.url)

            board.hold_local(server, on_ready=serving)
        say("TensorBoard ended")
        return

    assert cluster is not None
    [local] = choose_forwards([PortSpec(board.DEFAULT_PORT, port or board.DEFAULT_PORT)], say=say)
    board.serve_from_node(
        cluster, local.local, record.remote_dir if record else None, probe=probe, project_dir=project, say=say,
        on_ready=show,
    )
    say("TensorBoard ended")
