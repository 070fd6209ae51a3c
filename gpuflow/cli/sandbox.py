"""gpuflow CLI: ``gpuflow sandbox ...`` — acting as the sandbox cloud itself (``interrupt``: a spot reclaim).

Thin: parse options, call :mod:`gpuflow.clusters.interrupt`, print.  Only typer and
gpuflow's core at module level (``gpuflow --help`` must stay fast).
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from gpuflow.cli._app import app

sandbox_app = typer.Typer(
    name="sandbox",
    help="Act as the sandbox cloud (interrupt a node).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(sandbox_app, name="sandbox")


@sandbox_app.command("interrupt")
def interrupt(
    name: str = typer.Argument(..., help="The sandbox cluster."),
    node: Optional[str] = typer.Option(None, "--node", help="The instance to interrupt, i-... (default: the head node)."),
    notice_seconds: float = typer.Option(
        10.0, "--notice-seconds", help="Seconds between the notice and the termination (EC2 gives 120)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Interrupt a sandbox node as EC2 reclaims a spot instance.

    The node's metadata service (its loopback IMDSv2, $GPUFLOW_IMDS_ENDPOINT on the
    node) serves the spot instance-action notice as soon as the watchers of the node's
    running jobs are watching (at once, or within 30 seconds); after --notice-seconds the
    instance is terminated with the state reason Server.SpotInstanceTermination and
    its processes are killed.  Returns once the notice is served; works for `up --sandbox`
    clusters and for the in-process cloud of `run --up --sandbox`.
    """
    from gpuflow.clusters.interrupt import interrupt_node

    done = interrupt_node(name, node, notice_seconds=notice_seconds)
    if as_json:
        typer.echo(json.dumps(done.to_json(), indent=2))
        return
    typer.echo(
        f"{done.instance_id} of {done.cluster}: spot interruption notice served "
        f"({json.dumps(done.notice)}); terminated at {done.notice['time']} ({done.notice_seconds:g} s from now)"
    )
