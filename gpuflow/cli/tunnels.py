"""gpuflow CLI: `gpuflow forward` (thin: the work is in gpuflow.tunnels)."""

from __future__ import annotations

from typing import Optional

import typer

from gpuflow.cli._app import app
from gpuflow.config import find_project_root
from gpuflow.errors import ClusterNotFound


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
        ..., metavar="REMOTE_PORT[:LOCAL_PORT]...",
        help="The node's port (on its 127.0.0.1), and this machine's port for it (default: the same number).",
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
    """Forward ports of a node's loopback to 127.0.0.1 here, until Ctrl-C.

    Through the cluster's pinned SSH connection: no port is opened in the
    security group, and the local ports listen on 127.0.0.1 only. A taken local
    port becomes the next free one. A dropped connection is reopened.
    """
    from gpuflow import clusters
    from gpuflow.tunnels.forward import hold_forwards, plan_forward
    from gpuflow.tunnels.ports import choose_forwards, parse_port_spec

    specs = [parse_port_spec(spec) for spec in ports]
    cluster, project = _cluster(name)

    def say(line: str) -> None:
        typer.echo(line, err=True)

    forwards = choose_forwards(specs, say=say)
    plan = plan_forward(
        cluster, forwards, instance_id=node, trust_on_first_use=trust_on_first_use, probe=clusters.cloud_probe(),
        project_dir=project,
    )
    shown: list[bool] = []

    def ready(_tunnel: object) -> None:
        if shown:
            return
        shown.append(True)
        for item in forwards:
            typer.echo(f"{item.url} -> port {item.remote} on {plan.describe}")
        typer.echo("forwarding (127.0.0.1 only; Ctrl-C ends it)", err=True)

    hold_forwards(cluster, forwards, plan, say=say, on_ready=ready)
    typer.echo("forward ended", err=True)
