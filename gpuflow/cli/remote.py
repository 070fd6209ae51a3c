"""gpuflow CLI: `gpuflow ssh NAME [-- CMD]` and `gpuflow ssh-config` (thin: the work is in gpuflow.nodes)."""

from __future__ import annotations

from typing import Optional

import typer

from gpuflow.cli._app import app
from gpuflow.config import find_project_root
from gpuflow.cli._grammar import SshCommand
from gpuflow.errors import ClusterNotFound, UsageError
from gpuflow.transport.openssh import open_shared


@app.command("ssh", cls=SshCommand)
def ssh(
    name: str = typer.Argument(..., help="The cluster to reach."),
    command: Optional[list[str]] = typer.Argument(  # noqa: UP007 - typer needs Optional on 3.10
        None, help="A command to run instead of a shell; put it after `--`. Each argument arrives literally."
    ),
    node: Optional[str] = typer.Option(  # noqa: UP007
        None, "--node", metavar="INSTANCE_ID", help="Reach this instance instead of the head node."
    ),
    trust_on_first_use: bool = typer.Option(
        False,
        "--trust-on-first-use",
        help="Accept and pin the host key the instance presents when its console shows none (warns).",
    ),
) -> None:
    """Open a shell on a cluster, or run a command there.

    The instance must present its pinned host key. The command goes after
    `--`; each of its arguments arrives literally.
    """
    import os
    import sys

    from gpuflow import clusters
    from gpuflow.nodes import ssh_invocation

    project = find_project_root()  # whose config says how a sandbox cluster is reached
    try:
        cluster = clusters.get_cluster(name, project_dir=project)
    except ClusterNotFound as exc:
        raise clusters.explain_unknown(name, exc, project_dir=project) from exc  # whose it is, when its tags say
    invocation = ssh_invocation(
        cluster, command or None, instance_id=node, trust_on_first_use=trust_on_first_use, probe=clusters.cloud_probe(),
        project_dir=project,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    if invocation.cwd:
        os.chdir(invocation.cwd)
    argv = open_shared(invocation.argv)  # rides the shared connection, or becomes its master
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:  # ssh (or bash) is not installed
        raise UsageError(f"cannot run {invocation.argv[0]}: {exc.strerror}", hint="install the OpenSSH client") from exc


@app.command("ssh-config")
def ssh_config(
    install: bool = typer.Option(
        False, "--install", help="Also add the Include line to the top of ~/.ssh/config (once)."
    ),
) -> None:
    """Write ssh Host entries for every cluster.

    They go to $GPUFLOW_HOME/ssh_config, so that plain ssh, scp, rsync and
    editors reach a cluster by name.
    """
    from gpuflow.clusters import known_clusters
    from gpuflow.ssh_config import install_ssh_include, write_ssh_config

    report = write_ssh_config(known_clusters())
    typer.echo(f"wrote {report.path}: {len(report.hosts)} host(s){': ' if report.hosts else ''}{' '.join(report.hosts)}")
    for line in report.skipped:
        typer.echo(f"  skipped {line}")
    if install:
        changed = install_ssh_include(report.include_line)
        typer.echo(f"{'added' if changed else 'already present'} in ~/.ssh/config: {report.include_line}")
    else:
        typer.echo(f"add this line at the top of ~/.ssh/config (or run with --install): {report.include_line}")
