"""gpuflow CLI: cluster commands — up, status, ls, down, reap.

Thin: parse options, call :mod:`gpuflow.clusters`, print.  Only typer and gpuflow's
core are imported at module level (``gpuflow --help`` must stay fast); the use cases,
rich and boto3 load when a command runs.  Progress goes to stderr and only
when stderr is a terminal and ``--json`` is off, so scripts and CI see clean
output.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer

from gpuflow.cli._app import app
from gpuflow.cli import _confirm  # its functions looked up there when called (tests stand in a terminal)
from gpuflow.cli._table import table_lines
from gpuflow.errors import GpuflowError, UsageError
from gpuflow.config import find_project_root

_NAME = typer.Argument(None, help="Cluster name (default: the project config's `cluster`, or the only cluster).")
_JSON = typer.Option(False, "--json", help="Print JSON on stdout (no progress display).")
_SANDBOX = typer.Option(
    None, "--sandbox/--no-sandbox", help="The sandbox cloud, or AWS (default: the project config's `sandbox`, else AWS)."
)
_ANY_OWNER_HELP = "Also what other gpuflow installs created (default: only this one's)."


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A callable that shows the latest step on a live stderr line, or does nothing."""
    if not enabled or not sys.stderr.isatty():
        yield lambda message: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("starting") as live_status:
        yield lambda message: live_status.update(message)


def _warn(message: str) -> None:
    typer.echo(f"gpuflow: warning: {message}", err=True)


def _money(value: float | None) -> str:
    if value is None:
        return "?"
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"  # spot prices and short runs are cents


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@app.command()
def up(
    name: Optional[str] = typer.Argument(None, help="Cluster name (default: the project config's `cluster`, else the project directory's name)."),
    instance_type: Optional[str] = typer.Option(None, "--instance-type", "-t", metavar="TYPE", help="EC2 instance type (default g5.xlarge)."),
    region: Optional[str] = typer.Option(None, "--region", "-r", help="AWS region (default: config, AWS_REGION, us-east-1)."),
    count: Optional[int] = typer.Option(None, "--count", "-n", metavar="N", help="Number of instances (default 1)."),
    spot: Optional[bool] = typer.Option(None, "--spot/--on-demand", help="Spot instances (default on-demand)."),
    spot_fallback: Optional[bool] = typer.Option(None, "--spot-fallback", help="Launch on-demand when no spot capacity."),
    disk_gb: Optional[int] = typer.Option(None, "--disk-gb", metavar="GIB", help="Root volume size in GiB (encrypted gp3, default 100)."),
    idle_minutes: Optional[int] = typer.Option(None, "--idle-minutes", metavar="MINUTES", help="Terminate after this long without a job or heartbeat (default 60)."),
    max_hours: Optional[float] = typer.Option(None, "--max-hours", metavar="HOURS", help="Terminate after this many hours in any case (default 24)."),
    ami: Optional[str] = typer.Option(None, "--ami", metavar="ID", help="AMI id (default: the AWS Deep Learning AMI with TensorFlow)."),
    key_name: Optional[str] = typer.Option(None, "--key-name", metavar="NAME", help="Use this existing EC2 key pair (with --key-path)."),
    key_path: Optional[str] = typer.Option(None, "--key-path", metavar="FILE", help="Private key file of --key-name."),
    ssh_cidr: Optional[str] = typer.Option(None, "--ssh-cidr", metavar="CIDR", help="Allow SSH from this range (default: your public IP /32)."),
    allow_ssh_from_anywhere: bool = typer.Option(False, "--allow-ssh-from-anywhere", help="Permit --ssh-cidr 0.0.0.0/0 (not recommended)."),
    allow_cpu: Optional[bool] = typer.Option(None, "--allow-cpu", help="Accept an instance type without GPUs."),
    profile: Optional[str] = typer.Option(None, "--profile", help="AWS profile (default: the standard credential chain)."),
    sandbox: Optional[bool] = typer.Option(None, "--sandbox", help="Use the offline sandbox cloud (moto) instead of AWS."),
    as_json: bool = _JSON,
) -> None:
    """Launch a GPU cluster that ends itself when idle.

    The cluster terminates itself after --idle-minutes without a job or after
    --max-hours in any case; a failed or interrupted launch deletes what it made.
    """
    from gpuflow import clusters

    options = {
        "instance_type": instance_type,
        "region": region,
        "count": count,
        "spot": spot,
        "spot_fallback": spot_fallback,
        "disk_gb": disk_gb,
        "idle_minutes": idle_minutes,
        "max_hours": max_hours,
        "ami": ami,
        "key_name": key_name,
        "key_path": key_path,
        "ssh_cidr": ssh_cidr,
        "allow_ssh_from_anywhere": allow_ssh_from_anywhere or None,
        "allow_cpu": allow_cpu,
        "profile": profile,
        "sandbox": sandbox,
    }
    spec = clusters.resolve_spec(name, options, project_dir=_project())
    with _progress(not as_json) as progress:
        cluster = clusters.up(spec, progress=progress, warn=_warn)
    if as_json:
        typer.echo(json.dumps(cluster.to_dict(), indent=2))
        return
    market = "spot" if any(node.lifecycle == "spot" for node in cluster.nodes) else "on-demand"
    typer.echo(f"cluster {cluster.name} is up: {len(cluster.nodes)} x {cluster.instance_type} ({market}) in {cluster.region}")
    for node in cluster.nodes:
        typer.echo(f"  {node.instance_id}  {node.public_ip or '-'}  {node.availability_zone or ''}  {node.state}")
    head = cluster.nodes[0] if cluster.nodes else None
    if head is not None and head.public_ip and not cluster.sandbox:
        typer.echo(f"reach it: gpuflow ssh {cluster.name}   (or ssh -i {cluster.key_path} {cluster.ssh_user}@{head.public_ip})")
    price = None if cluster.price_per_hour is None else cluster.price_per_hour * len(cluster.nodes)
    typer.echo(
        f"cost: {_money(price)}/h; terminates itself after {spec.idle_minutes} idle min or {spec.max_hours:g} h; "
        f"{clusters.command_hint(f'down {cluster.name}', cluster.sandbox)} when done"
    )


def _print_statuses(statuses: list[Any], *, complete: bool = True) -> None:
    from gpuflow.clusters import ClusterState, command_hint

    if not statuses:
        if complete:  # else "no clusters" would be untrue: the caller says what was not checked
            typer.echo("no clusters")
        return
    header = ("NAME", "STATE", "TYPE", "N", "REGION", "ADDRESS", "UPTIME", "$/H", "$ SO FAR")
    rows = [
        (
            item.cluster.name,
            str(item.state),
            item.cluster.instance_type,
            str(len(item.cluster.nodes)),
            item.cluster.region + (" (sandbox)" if item.cluster.sandbox else ""),
            item.address or "-",
            _duration(item.uptime_seconds) if item.uptime_seconds else "-",
            _money(item.price_per_hour),
            _money(item.cost_so_far),
        )
        for item in statuses
    ]
    for line in table_lines(header, rows):
        typer.echo(line)
    for sandbox in sorted({item.cluster.sandbox for item in statuses if item.state is ClusterState.UNMANAGED}):
        typer.echo(
            f"unmanaged{' (sandbox)' if sandbox else ''}: tagged by gpuflow but unknown here; "
            f"{command_hint('reap', sandbox)} removes those this gpuflow created (--any-owner: anyone's)",
            err=True,
        )


@app.command()
def status(
    name: Optional[str] = _NAME,
    sandbox: Optional[bool] = _SANDBOX,
    any_owner: bool = typer.Option(False, "--any-owner", help=_ANY_OWNER_HELP),
    as_json: bool = _JSON,
) -> None:
    """Show a cluster as EC2 sees it now.

    State, address, uptime, $/h and $ so far, what each running node's
    dead-man's switch thinks (busy or idle, why, and when it stops), and the
    notebooks, forwards and TensorBoards open on this machine.
    """
    from gpuflow import clusters
    from gpuflow.clusters import switch as switch_status
    from gpuflow.tunnels import registry

    result = clusters.status(name, sandbox=sandbox, any_owner=any_owner, project_dir=_project())
    # A cluster without a record here (unmanaged) has no key or pinned host keys here: no switch to ask.
    switches = switch_status.read_switches(result.cluster) if result.known_locally else []
    tunnels = registry.open_tunnels(result.cluster.name)  # notebooks, forwards, TensorBoards open on this machine
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "switch": [item.to_dict() for item in switches],
                               "tunnels": [tunnel.to_dict() for tunnel in tunnels]}, indent=2))
    else:
        _print_statuses([result])
        for line in switch_status.describe(switches):
            typer.echo(line)
        for line in registry.describe(tunnels):
            typer.echo(line)


@app.command("ls")
def list_command(
    region: Optional[str] = typer.Option(None, "--region", "-r", help="Also scan this region for unknown gpuflow instances."),
    sandbox: Optional[bool] = _SANDBOX,
    as_json: bool = _JSON,
) -> None:
    """List clusters, reconciled with EC2.

    Instances tagged by gpuflow but unknown here are listed as unmanaged. A place
    that cannot be asked (no usable credentials, AWS unreachable) is named in one
    line and its recorded clusters are listed as unchecked; the exit code is 0
    unless no place at all could be asked.
    """
    from gpuflow import clusters

    listing = clusters.list_clusters(region=region, sandbox=sandbox, project_dir=_project())
    if as_json:
        typer.echo(json.dumps([item.to_dict() for item in listing], indent=2))
    else:
        _print_statuses(list(listing), complete=not listing.unchecked_places)
        if listing.aws_left_to_sandbox:
            typer.echo(
                "unchecked: AWS clusters known here, not asked (the sandbox is in effect); `gpuflow ls --no-sandbox` asks AWS",
                err=True,
            )
    failure = listing.failure()
    if failure is not None:  # nothing could be checked: the one line is the error
        raise failure
    for line in listing.not_checked_lines():
        _warn(line)


@app.command()
def down(
    name: Optional[str] = _NAME,
    all_clusters: bool = typer.Option(False, "--all", help="Take down every cluster gpuflow knows."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    region: Optional[str] = typer.Option(None, "--region", "-r", help="Where to look when the cluster is not in the local state."),
    sandbox: Optional[bool] = _SANDBOX,
    any_owner: bool = typer.Option(False, "--any-owner", help=_ANY_OWNER_HELP),
    as_json: bool = _JSON,
) -> None:
    """Terminate a cluster and delete what gpuflow made for it.

    Its instances are terminated and the security group and key pair gpuflow
    made are deleted. It says what it will delete and asks first; without a
    terminal it needs --yes.
    """
    from gpuflow import clusters

    if all_clusters and name:
        raise UsageError("give a cluster name or --all, not both")
    project = _project()
    in_sandbox = clusters.sandbox_in_effect(sandbox, project_dir=project)
    if all_clusters:
        what = ["every cluster this gpuflow knows" + (" in the sandbox" if in_sandbox else "")
                + ": its instances (terminated), security group and key pair"]
        again = clusters.command_hint("down --all --yes" + (" --any-owner" if any_owner else ""), in_sandbox)
    else:
        name = clusters.resolve_cluster_name(name, project_dir=project)
        what = [_what_down_deletes(name, region)]
        again = clusters.command_hint(
            f"down {name} --yes" + (f" --region {region}" if region else "") + (" --any-owner" if any_owner else ""),
            in_sandbox,
        )
    if not _confirm.confirm_deletion(what, yes=yes, command="down --all" if all_clusters else "down", again=again):
        return
    with _progress(not as_json) as progress:
        if all_clusters:
            reports = clusters.down_all(sandbox=sandbox, any_owner=any_owner, progress=progress, project_dir=project)
        else:
            reports = [clusters.down(name, region=region, sandbox=sandbox, any_owner=any_owner, progress=progress,
                                     project_dir=project)]
    if as_json:
        typer.echo(json.dumps([report.to_dict() for report in reports], indent=2))
        return
    if not reports:
        typer.echo("no clusters")
    for report in reports:
        if report.skipped:
            typer.echo(
                f"left alone: {len(report.skipped)} resource(s) named {report.name} that another gpuflow created "
                f"({clusters.whose(report.skipped)}); --any-owner includes them",
                err=True,
            )
        if report.already_down:
            typer.echo(f"cluster {report.name} is already down")
            continue
        typer.echo(
            f"cluster {report.name} is down: {len(report.terminated)} instance(s) terminated, "
            f"ran {_duration(report.run_seconds)}, estimated cost {_money(report.estimated_cost)}"
        )


def _project() -> Path:
    """The project these commands work on: the one around the current directory,
    decided here (the CLI layer) and handed to every use case that reads its config."""
    return find_project_root()


def _what_down_deletes(name: str, region: str | None) -> str:
    """What `down NAME` deletes, as the local record tells (no cloud call before the question)."""
    from gpuflow import clusters

    try:
        cluster = clusters.get_cluster(name, project_dir=_project())
    except GpuflowError:  # no record here (or a damaged one): down finds it by its tags
        return f"cluster {name}{f' in {region}' if region else ''}: the instances, security group and key pair " \
            "this gpuflow made for it"
    ids = ", ".join(node.instance_id for node in cluster.nodes) or "none recorded"
    return (f"cluster {name} in {cluster.region}{' (sandbox)' if cluster.sandbox else ''}: "
            f"{len(cluster.nodes)} instance(s) terminated ({ids}), the security group and key pair gpuflow made for it")


@app.command()
def reap(
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete what was found (default: only list it)."),
    region: Optional[str] = typer.Option(None, "--region", "-r", help="Region to scan (plus those of known clusters)."),
    sandbox: Optional[bool] = _SANDBOX,
    any_owner: bool = typer.Option(
        False, "--any-owner", help="Also reap what other gpuflow installs created (default: only this one's)."
    ),
    owner_prefix: Optional[str] = typer.Option(
        None, "--owner-prefix", metavar="PREFIX", help="With --any-owner: only what owner ids starting with this created (CI: one pipeline run's jobs)."
    ),
    expired: bool = typer.Option(False, "--expired", help="Only what is past its --max-hours (a scheduled CI janitor)."),
    as_json: bool = _JSON,
) -> None:
    """Remove what this gpuflow tagged and no cluster owns.

    Without --yes it lists what it would delete (a dry run) and, on a terminal,
    then asks. It is safe to run from CI.
    """
    from gpuflow import clusters

    project = _project()
    sandbox = clusters.sandbox_in_effect(sandbox, project_dir=project)
    options = {"region": region, "sandbox": sandbox, "any_owner": any_owner, "owner_prefix": owner_prefix,
               "expired_only": expired, "project_dir": project}
    with _progress(not as_json) as progress:
        result = clusters.reap(yes=yes, progress=progress, **options)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    _print_reaped(result, owner_prefix)
    if result.deleted or not result.items:
        return
    again = clusters.command_hint(
        "reap --yes" + (" --any-owner" if any_owner else "") + (f" --owner-prefix {owner_prefix}" if owner_prefix else "")
        + (" --expired" if expired else ""),
        sandbox,
    )
    if not _confirm.stdin_is_terminal():  # a dry run: it deleted nothing, and says how to delete
        typer.echo(f"dry run: run {again} to delete these", err=True)
        return
    listed = [f"the {len(result.items)} item(s) listed above"]
    if not _confirm.confirm_deletion(listed, yes=False, command="reap", again=again):
        return
    with _progress(True) as progress:
        # Scanned again, with the same scope: only what is still an orphan now is deleted, and listed.
        _print_reaped(clusters.reap(yes=True, progress=progress, **options), owner_prefix)


def _print_reaped(result: Any, owner_prefix: str | None) -> None:
    if result.skipped:
        owners = sorted({item.owner or item.owner_id or "unknown" for item in result.skipped})
        typer.echo(
            f"left alone: {len(result.skipped)} item(s) other gpuflow installs created ({', '.join(owners)}); "
            + (f"their owner ids do not start with {owner_prefix}" if owner_prefix else "--any-owner includes them"),
            err=True,
        )
    if result.unexpired:
        typer.echo(f"left alone: {len(result.unexpired)} item(s) not past their --max-hours yet", err=True)
    if not result.items:
        typer.echo(f"nothing to reap in {', '.join(result.regions)}")
        return
    verb = "deleted" if result.deleted else "would delete"
    for item in result.items:
        owner = f", owner {item.owner}" if item.owner else ""
        typer.echo(f"{verb} {item.kind} {item.resource_id} ({item.region}, cluster {item.cluster or '?'}{owner}: {item.reason})")
