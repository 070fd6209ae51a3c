"""gpuflow CLI: ``setup`` — the account stack of durable runs (a bucket and the instances' role) in one region.

Thin: parse options, call :mod:`gpuflow.durable.stack`, print.  The use case (and
boto3) loads when the command runs.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from gpuflow.cli._app import app
from gpuflow.config import find_project_root, project_config
from gpuflow.errors import UsageError


def _say(enabled: bool) -> Any:
    return (lambda message: typer.echo(f"gpuflow: {message}", err=True)) if enabled else (lambda message: None)


def _plan_lines(plan: Any) -> list[str]:
    verb = "create" if plan.kind == "CREATE" else "update"
    parameters = ", ".join(f"{key}={value}" for key, value in plan.parameters)
    if plan.no_changes:
        return [f"plan: the account stack {plan.stack_name} in {plan.region} is up to date ({parameters}): no changes"]
    lines = [f"plan: {verb} the account stack {plan.stack_name} in {plan.region} ({parameters}), change set {plan.change_set_name}:"]
    if plan.replaces_failed_stack:
        lines.append("  (an earlier failed create was deleted first)")
    lines += [f"  {change.describe()}" for change in plan.changes] or ["  (CloudFormation listed no resource changes)"]
    return lines


@app.command()
def setup(
    region: Optional[str] = typer.Option(None, "--region", "-r", help="AWS region (default: config, AWS_REGION, us-east-1)."),
    retention_days: int = typer.Option(30, "--retention-days", metavar="DAYS", help="Expire runs' data in the bucket after this many days."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the template and the change set; change nothing."),
    delete: bool = typer.Option(False, "--delete", help="Delete the stack (its bucket, role and instance profile)."),
    force: bool = typer.Option(False, "--force", help="With --delete: also delete the runs the bucket holds."),
    profile: Optional[str] = typer.Option(None, "--profile", help="AWS profile (default: the standard credential chain)."),
    sandbox: Optional[bool] = typer.Option(None, "--sandbox/--no-sandbox", help="The sandbox cloud, or AWS (default: the project config's `sandbox`, else AWS)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Set up durable runs: the S3 bucket and instance role.

    It holds an S3 bucket for runs' checkpoints, logs and outputs (encrypted, never
    public, TLS only, expiring after --retention-days) and the role `gpuflow up`
    gives its instances: read, write and list under the bucket's runs/ and nothing
    else.  The change set is shown, then executed; running it again changes nothing.
    """
    from gpuflow import clusters
    from gpuflow.durable import stack

    if force and not delete:
        raise UsageError("--force goes with --delete", hint="`gpuflow setup --delete --force`")
    if delete and dry_run:
        raise UsageError("--dry-run shows a deployment, not a deletion", hint="drop --dry-run or --delete")
    project = find_project_root()
    in_sandbox = clusters.sandbox_in_effect(sandbox, project_dir=project)
    where = region or project_config(project).cluster.region or clusters.default_region()
    say = _say(not as_json)
    if delete:
        result = stack.delete(where, force=force, profile=profile, sandbox=in_sandbox, report=say)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        elif result.outcome is stack.SetupOutcome.ABSENT:
            typer.echo(f"no account stack {result.stack_name} in {where}: nothing to delete")
        else:
            emptied = f" ({result.objects_deleted} object(s) deleted from its bucket)" if result.objects_deleted else ""
            typer.echo(f"deleted the account stack {result.stack_name} in {where}{emptied}")
        return
    stack.validate_retention_days(retention_days)
    if dry_run and not as_json:
        typer.echo(stack.template_text().rstrip("\n"))

    def show(plan: Any) -> None:
        if not as_json:
            for line in _plan_lines(plan):
                typer.echo(line, file=sys.stdout if dry_run else sys.stderr)

    result = stack.setup(where, retention_days=retention_days, dry_run=dry_run, profile=profile, sandbox=in_sandbox,
                         report=say, show_plan=show)
    if as_json:
        data = result.to_dict()
        if dry_run:
            data["template"] = json.loads(stack.template_text())
        typer.echo(json.dumps(data, indent=2))
        return
    if result.outcome is stack.SetupOutcome.PLANNED:
        typer.echo("dry run: nothing was changed")
        return
    store = result.store
    state = {"created": "created", "updated": "updated", "unchanged": "up to date"}[result.outcome.value]
    typer.echo(f"account stack {result.stack_name} in {where}: {state}")
    if store is not None:
        typer.echo(f"  bucket: s3://{store.bucket} (runs expire after {retention_days} days)")
        typer.echo(f"  instance role: {store.role_name} (profile {store.instance_profile_name})")
        typer.echo("  `gpuflow up` in this region now gives its instances this role")
