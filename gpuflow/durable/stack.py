"""``gpuflow setup``: deploy, describe and delete the account stack of durable runs (one per region).

The stack (``infra/account-stack.json``) holds the bucket runs are kept in and
the role gpuflow's instances get; :func:`find_store` turns a deployed stack
into the :class:`~gpuflow.durable.DurableStore` every durable part reads.
Deploying goes through a change set: made, shown, then executed ("no changes"
is success); ``dry_run`` makes it, shows it and deletes it again, so nothing
changes.  Deleting refuses while the bucket holds runs, unless ``force``
(which empties the bucket first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gpuflow.durable import DurableStore
from gpuflow.errors import CloudError, CredentialsError, UsageError
from gpuflow.hints import command_hint
from gpuflow.provisioner import Provisioner, ProvisionerFactory, open_provisioner, release_emptied_sandbox
from infra.account_stack import (
    DEFAULT_RETENTION_DAYS,
    MAX_RETENTION_DAYS,
    MIN_RETENTION_DAYS,
    STACK_NAME,
    AccountStackView,
    ResourceChange,
    StackPlan,
    template_body,
)

Report = Callable[[str], None]


class SetupOutcome(str, Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    PLANNED = "planned"  # --dry-run: shown, nothing changed
    DELETED = "deleted"
    ABSENT = "absent"  # --delete of a region without the stack


@dataclass(frozen=True)
class SetupResult:
    region: str
    stack_name: str
    outcome: SetupOutcome
    kind: str | None = None  # CREATE | UPDATE (the change set's), None when nothing was planned
    changes: tuple[ResourceChange, ...] = ()
    retention_days: int | None = None
    store: DurableStore | None = None
    objects_deleted: int = 0
    sandbox: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "stack_name": self.stack_name,
            "outcome": self.outcome.value,
            "kind": self.kind,
            "changes": [{"action": change.action, "logical_id": change.logical_id, "type": change.resource_type,
                         "replacement": change.replacement} for change in self.changes],
            "retention_days": self.retention_days,
            "store": None if self.store is None else {
                "bucket": self.store.bucket, "role_name": self.store.role_name,
                "instance_profile_name": self.store.instance_profile_name,
                "instance_profile_arn": self.store.instance_profile_arn,
            },
            "objects_deleted": self.objects_deleted,
            "sandbox": self.sandbox,
        }


def _open(factory: ProvisionerFactory | None, region: str, profile: str | None, sandbox: bool) -> Provisioner:
    from infra.aws.provisioner import Ec2Provisioner  # boto3: only when the stack is asked about

    Ec2Provisioner.validate_region(region)
    if factory is not None:
        return factory(region, profile=profile, sandbox=sandbox)
    return open_provisioner(region, profile=profile, sandbox=sandbox)


def store_of(view: AccountStackView | None) -> DurableStore | None:
    """The store a described stack provides (None unless it is deployed and complete)."""
    if view is None or not view.usable or not (view.bucket and view.instance_profile_arn):
        return None
    return DurableStore(
        region=view.region,
        stack_name=view.stack_name,
        bucket=view.bucket,
        role_name=view.role_name or "",
        instance_profile_name=view.instance_profile_name or "",
        instance_profile_arn=view.instance_profile_arn,
    )


def store_in(provisioner: Provisioner) -> DurableStore | None:
    """The region's durable store through an open provisioner (``up`` uses its own)."""
    return store_of(provisioner.describe_account_stack(STACK_NAME))


def find_store(region: str, *, profile: str | None = None, sandbox: bool = False,
               provisioner_factory: ProvisionerFactory | None = None) -> DurableStore | None:
    """The durable store of ``region``: the account stack's outputs, or None without the stack."""
    return store_in(_open(provisioner_factory, region, profile, sandbox))


def validate_retention_days(days: int) -> int:
    if not MIN_RETENTION_DAYS <= days <= MAX_RETENTION_DAYS:
        raise UsageError(f"--retention-days {days} is out of range",
                         hint=f"give {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS} days")
    return days


def template_text() -> str:
    """The template ``setup`` deploys (``--dry-run`` prints it)."""
    return template_body()


def setup(
    region: str,
    *,
    retention_days: int = DEFAULT_RETENTION_DAYS,
    dry_run: bool = False,
    profile: str | None = None,
    sandbox: bool = False,
    report: Report | None = None,
    show_plan: Callable[[StackPlan], None] | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
) -> SetupResult:
    """Deploy or update the account stack in ``region``: make a change set, show it
    (``show_plan``), execute it.  Idempotent: when nothing would change, nothing is
    executed.  ``dry_run``: show the plan, then delete the change set (and a stack
    the change set itself brought into review), so nothing changes."""
    say = report or (lambda message: None)
    validate_retention_days(retention_days)
    provisioner = _open(provisioner_factory, region, profile, sandbox)
    say(f"planning the account stack {STACK_NAME} in {region}")
    plan = provisioner.plan_account_stack(retention_days, STACK_NAME)
    try:
        if show_plan is not None:
            show_plan(plan)
    except BaseException:  # e.g. Ctrl-C while the plan is shown: the change set is not left behind
        provisioner.discard_account_stack_plan(plan)
        raise
    base = dict(region=region, stack_name=STACK_NAME, kind=plan.kind, changes=plan.changes,
                retention_days=retention_days, sandbox=sandbox)
    if dry_run:
        provisioner.discard_account_stack_plan(plan)
        return SetupResult(outcome=SetupOutcome.PLANNED, store=store_in(provisioner) if plan.kind == "UPDATE" else None,
                           **base)
    if plan.no_changes:
        return SetupResult(outcome=SetupOutcome.UNCHANGED, store=store_in(provisioner), **base)
    say(f"{'creating' if plan.kind == 'CREATE' else 'updating'} the account stack {STACK_NAME} in {region}")
    view = provisioner.execute_account_stack_plan(plan)
    store = store_of(view)
    if store is None:  # pragma: no cover - execute raises unless the stack is usable
        raise CloudError(f"the account stack {STACK_NAME} in {region} is not usable after the change ({view.status})")
    return SetupResult(outcome=SetupOutcome.CREATED if plan.kind == "CREATE" else SetupOutcome.UPDATED,
                       store=store, **base)


def delete(
    region: str,
    *,
    force: bool = False,
    profile: str | None = None,
    sandbox: bool = False,
    report: Report | None = None,
    provisioner_factory: ProvisionerFactory | None = None,
) -> SetupResult:
    """Delete the account stack of ``region`` (its bucket, role and profile).  Refuses
    while the bucket holds objects under ``runs/`` unless ``force``, which empties the
    bucket first.  A region without the stack is success (nothing to delete)."""
    say = report or (lambda message: None)
    provisioner = _open(provisioner_factory, region, profile, sandbox)
    view = provisioner.describe_account_stack(STACK_NAME)
    base = dict(region=region, stack_name=STACK_NAME, sandbox=sandbox)
    if view is None:
        _release_emptied_sandbox(sandbox, provisioner_factory)
        return SetupResult(outcome=SetupOutcome.ABSENT, **base)
    if view.status.endswith("_IN_PROGRESS") and view.status != "REVIEW_IN_PROGRESS":
        raise CloudError(f"the account stack {STACK_NAME} in {region} is busy ({view.status})",
                         hint="wait for that operation to end, then delete again")
    deleted = 0
    bucket = view.bucket
    if bucket is not None:
        runs = provisioner.run_objects_count(bucket)
        if runs and not force:
            more = "+" if runs >= 1000 else ""
            raise UsageError(
                f"the bucket {bucket} still holds {runs}{more} object(s) of runs: the account stack was not deleted",
                hint=f"{command_hint(f'setup --delete --force --region {region}', sandbox)} deletes them with it",
            )
        say(f"emptying s3://{bucket}")
        deleted = provisioner.empty_bucket(bucket)
    say(f"deleting the account stack {STACK_NAME} in {region}")
    provisioner.delete_account_stack(STACK_NAME)
    _release_emptied_sandbox(sandbox, provisioner_factory)
    return SetupResult(outcome=SetupOutcome.DELETED, objects_deleted=deleted, **base)


def _release_emptied_sandbox(sandbox: bool, provisioner_factory: ProvisionerFactory | None) -> None:
    """The sandbox server was kept running for the stack: holding nothing now, it goes at once
    (not after its idle timeout), unless another process uses it or it holds anything else."""
    if sandbox and provisioner_factory is None:
        release_emptied_sandbox()


def durable_hint(sandbox: bool) -> str:
    """The one line ``up`` prints where durability would have helped (spot, no stack)."""
    return (f"spot instances can be reclaimed at two minutes' notice; {command_hint('setup', sandbox)} once per region "
            "keeps runs' checkpoints and logs in S3 (durable runs)")


def probe_store(provisioner: Provisioner, warning: Report) -> DurableStore | None:
    """``up``'s look for the store: None without the stack, and also (saying so once)
    when the stack cannot be read (an IAM policy without cloudformation:DescribeStacks)."""
    try:
        return store_in(provisioner)
    except CredentialsError as exc:  # any other failure stops `up` before it creates anything
        warning(f"could not read the account stack ({exc}); launching without the durable runs' role")
        return None


__all__ = [
    "SetupOutcome",
    "SetupResult",
    "delete",
    "durable_hint",
    "find_store",
    "probe_store",
    "setup",
    "store_in",
    "store_of",
    "template_text",
    "validate_retention_days",
]
