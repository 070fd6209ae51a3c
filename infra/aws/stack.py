"""The account stack on AWS: deploy (change set: create, describe, execute), describe, delete.

A part of :class:`infra.aws.provisioner.Ec2Provisioner` (it uses its ``api``,
``poll_seconds``, ``timeout_seconds`` and clock), so the same code runs against
AWS, the sandbox's moto server and the in-process mock.  The template and the
records are :mod:`infra.account_stack`.

moto (5.x) does not model everything CloudFormation does; where it differs the
code reads what both answer the same way:

* a stack made by a change set has no ``Outputs`` in moto: the store is then read
  from the stack's resources (their physical ids are the same names);
* moto ignores ``AWS::S3::BucketPolicy`` and the bucket's ``PublicAccessBlock``
  and ``LifecycleConfiguration`` properties (the template is checked itself);
* moto lists no ``Changes`` for an UPDATE change set.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from infra.account_stack import (
    BUCKET_RESOURCE,
    BUSY_SUFFIX,
    CAPABILITIES,
    OUTPUT_BUCKET,
    OUTPUT_PROFILE_ARN,
    OUTPUT_PROFILE_NAME,
    OUTPUT_ROLE,
    PROFILE_RESOURCE,
    RETENTION_PARAMETER,
    ROLE_RESOURCE,
    STACK_NAME,
    USABLE_STATES,
    AccountStackView,
    ResourceChange,
    StackPlan,
    template_body,
)
from infra.aws.client import AwsApi, error_code
from infra.errors import CloudError, GpuflowError

# CloudFormation's answers to a change set that would change nothing.
_NO_CHANGE_REASONS = ("didn't contain changes", "No updates are to be performed")
_RUNS_PREFIX = "runs/"


class StackBusy(CloudError):
    """Another operation is in progress on the stack."""


class AccountStacks:
    """The account stack of this region (mixed into the EC2 provisioner)."""

    api: AwsApi
    region: str
    poll_seconds: float
    timeout_seconds: float
    _clock: Callable[[], float]

    # ------------------------------------------------------------------ describe
    def describe_account_stack(self, stack_name: str = STACK_NAME) -> AccountStackView | None:
        """The stack, or None when the region has none (never created, or deleted)."""
        try:
            [stack] = self.api.call("cloudformation", "describe_stacks", StackName=stack_name)["Stacks"]
        except GpuflowError as exc:
            if error_code(exc) == "ValidationError" and "does not exist" in str(exc):
                return None
            raise
        status = stack["StackStatus"]
        if status == "DELETE_COMPLETE":
            return None
        parameters = {item["ParameterKey"]: item.get("ParameterValue") for item in stack.get("Parameters", [])}
        retention = parameters.get(RETENTION_PARAMETER)
        view = AccountStackView(
            region=self.region,
            stack_name=stack_name,
            stack_id=stack["StackId"],
            status=status,
            usable=status in USABLE_STATES,
            retention_days=int(retention) if retention and retention.isdigit() else None,
        )
        if not view.usable:
            # A failed delete or update still has its bucket (``setup --delete`` empties it, then retries).
            if status in ("DELETE_FAILED", "UPDATE_ROLLBACK_FAILED"):
                resources = self.api.call("cloudformation", "describe_stack_resources", StackName=stack_name)
                for item in resources["StackResources"]:
                    if item.get("LogicalResourceId") == BUCKET_RESOURCE and item.get("PhysicalResourceId") \
                            and item.get("ResourceStatus") != "DELETE_COMPLETE":
                        return replace(view, bucket=item["PhysicalResourceId"])
            return view
        outputs = {item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs", [])}
        if not all(outputs.get(key) for key in (OUTPUT_BUCKET, OUTPUT_ROLE, OUTPUT_PROFILE_NAME, OUTPUT_PROFILE_ARN)):
            outputs = self._outputs_from_resources(stack_name, stack["StackId"])
        return replace(view, bucket=outputs[OUTPUT_BUCKET], role_name=outputs[OUTPUT_ROLE],
                       instance_profile_name=outputs[OUTPUT_PROFILE_NAME],
                       instance_profile_arn=outputs[OUTPUT_PROFILE_ARN])

    def _outputs_from_resources(self, stack_name: str, stack_id: str) -> dict[str, str]:
        """The outputs as the stack's resources name them (moto keeps no outputs of a change-set stack)."""
        resources = self.api.call("cloudformation", "describe_stack_resources", StackName=stack_name)["StackResources"]
        physical = {item.get("LogicalResourceId"): item.get("PhysicalResourceId") for item in resources}
        missing = [name for name in (BUCKET_RESOURCE, ROLE_RESOURCE, PROFILE_RESOURCE) if not physical.get(name)]
        if missing:
            raise CloudError(f"the account stack {stack_name} in {self.region} lacks {', '.join(missing)}",
                             hint="run `gpuflow setup` again to repair it")
        # arn:<partition>:cloudformation:<region>:<account>:stack/...
        parts = stack_id.split(":")
        partition, account = parts[1], parts[4]
        profile = physical[PROFILE_RESOURCE]
        return {
            OUTPUT_BUCKET: physical[BUCKET_RESOURCE],
            OUTPUT_ROLE: physical[ROLE_RESOURCE],
            OUTPUT_PROFILE_NAME: profile,
            OUTPUT_PROFILE_ARN: f"arn:{partition}:iam::{account}:instance-profile/{profile}",
        }

    # ------------------------------------------------------------------ deploy
    def plan_account_stack(self, retention_days: int, stack_name: str = STACK_NAME) -> StackPlan:
        """Make and describe a change set that brings the stack to the template with
        ``retention_days``; nothing is changed until :meth:`execute_account_stack_plan`.
        A plan with ``no_changes`` holds no change set any more (it is deleted here)."""
        current = self.describe_account_stack(stack_name)
        replaces_failed = False
        if current is None or current.status == "REVIEW_IN_PROGRESS":
            kind = "CREATE"
        elif current.status == "ROLLBACK_COMPLETE":  # an earlier create failed: only deleting it lets one try again
            kind, replaces_failed = "CREATE", True
        elif current.status.endswith(BUSY_SUFFIX):
            raise StackBusy(f"the account stack {stack_name} in {self.region} is busy ({current.status})",
                            hint="wait for that operation to end, then run `gpuflow setup` again")
        elif current.usable:
            kind = "UPDATE"
        else:
            raise CloudError(f"the account stack {stack_name} in {self.region} is in state {current.status}",
                             hint="see its events in the CloudFormation console; `gpuflow setup --delete` removes it")
        if replaces_failed:
            self._delete_stack_and_wait(stack_name)
        parameters = ((RETENTION_PARAMETER, str(retention_days)),)
        name = f"gpuflow-{uuid.uuid4().hex[:16]}"
        self.api.call(
            "cloudformation", "create_change_set",
            StackName=stack_name,
            ChangeSetName=name,
            ChangeSetType=kind,
            TemplateBody=template_body(),
            Parameters=[{"ParameterKey": key, "ParameterValue": value} for key, value in parameters],
            Capabilities=list(CAPABILITIES),
            Tags=[{"Key": "gpuflow:managed", "Value": "true"}],
            Description="gpuflow setup",
        )
        try:
            described = self._wait_change_set(stack_name, name)
        except BaseException:
            self.discard_account_stack_plan_named(stack_name, name, kind)
            raise
        plan = StackPlan(region=self.region, stack_name=stack_name, change_set_name=name, kind=kind,
                         changes=tuple(_changes(described)), parameters=parameters,
                         replaces_failed_stack=replaces_failed)
        if described["Status"] == "FAILED":
            reason = str(described.get("StatusReason") or "")
            self.discard_account_stack_plan_named(stack_name, name, kind)
            if kind == "UPDATE" and any(text in reason for text in _NO_CHANGE_REASONS):
                return replace(plan, no_changes=True, changes=())
            raise CloudError(f"CloudFormation refused the account stack's change set: {reason or 'no reason given'}")
        return plan

    def _wait_change_set(self, stack_name: str, name: str) -> dict[str, Any]:
        deadline = self._clock() + self.timeout_seconds
        while True:
            described = self._describe_change_set(stack_name, name)
            if described["Status"] in ("CREATE_COMPLETE", "FAILED"):
                return described
            if self._clock() >= deadline:
                raise CloudError(f"the change set {name} was not ready within {self.timeout_seconds:g} s")
            self.api.sleep(self.poll_seconds)

    def _describe_change_set(self, stack_name: str, name: str) -> dict[str, Any]:
        described = self.api.call("cloudformation", "describe_change_set", StackName=stack_name, ChangeSetName=name)
        changes = list(described.get("Changes", []))
        token = described.get("NextToken")
        while token:
            page = self.api.call("cloudformation", "describe_change_set", StackName=stack_name, ChangeSetName=name,
                                 NextToken=token)
            changes.extend(page.get("Changes", []))
            token = page.get("NextToken")
        return {**described, "Changes": changes}

    def discard_account_stack_plan(self, plan: StackPlan) -> None:
        """Undo :meth:`plan_account_stack`: delete the change set and, for a stack the
        plan itself brought into being (REVIEW_IN_PROGRESS, no resources), the stack."""
        if not plan.no_changes:
            self.discard_account_stack_plan_named(plan.stack_name, plan.change_set_name, plan.kind)

    def discard_account_stack_plan_named(self, stack_name: str, name: str, kind: str) -> None:
        try:
            self.api.call("cloudformation", "delete_change_set", StackName=stack_name, ChangeSetName=name)
        except GpuflowError as exc:
            if error_code(exc) not in ("ChangeSetNotFound", "ValidationError"):
                raise
        if kind == "CREATE":
            current = self.describe_account_stack(stack_name)
            if current is not None and current.status == "REVIEW_IN_PROGRESS":
                self._delete_stack_and_wait(stack_name)

    def execute_account_stack_plan(self, plan: StackPlan) -> AccountStackView:
        """Execute the plan's change set and wait for the stack to settle.  A failed
        create leaves no stack behind (it is deleted); a failed update is rolled back
        by CloudFormation and reported."""
        if plan.no_changes:
            view = self.describe_account_stack(plan.stack_name)
            if view is None or not view.usable:
                raise CloudError(f"the account stack {plan.stack_name} in {self.region} is not usable")
            return view
        try:
            self.api.call("cloudformation", "execute_change_set", StackName=plan.stack_name,
                          ChangeSetName=plan.change_set_name)
            view = self._wait_stack_settled(plan.stack_name)
        except BaseException:
            if plan.kind == "CREATE":
                self._remove_failed_create(plan)
            raise
        if view is None or not view.usable or (plan.kind == "UPDATE" and view.status == "UPDATE_ROLLBACK_COMPLETE"):
            reason = self._latest_failure(plan.stack_name)
            if plan.kind == "CREATE":
                self._remove_failed_create(plan)
                raise CloudError(f"creating the account stack failed ({reason}); nothing was left behind")
            raise CloudError(f"updating the account stack failed and was rolled back ({reason}); it is as it was")
        return view

    def _remove_failed_create(self, plan: StackPlan) -> None:
        try:
            self._delete_stack_and_wait(plan.stack_name)
        except GpuflowError:
            pass  # the original error is the one to report; `gpuflow setup --delete` retries

    def _wait_stack_settled(self, stack_name: str) -> AccountStackView | None:
        deadline = self._clock() + self.timeout_seconds
        while True:
            view = self.describe_account_stack(stack_name)
            if view is None or not view.status.endswith(BUSY_SUFFIX) or view.status == "REVIEW_IN_PROGRESS":
                return view
            if self._clock() >= deadline:
                raise CloudError(f"the account stack {stack_name} did not settle within {self.timeout_seconds:g} s "
                                 f"(still {view.status})", hint="see its events in the CloudFormation console")
            self.api.sleep(self.poll_seconds)

    def _latest_failure(self, stack_name: str) -> str:
        try:
            events = self.api.call("cloudformation", "describe_stack_events", StackName=stack_name)["StackEvents"]
        except GpuflowError:
            return "see the stack's events"
        for event in events:
            if event.get("ResourceStatus", "").endswith("_FAILED") and event.get("ResourceStatusReason"):
                return f"{event.get('LogicalResourceId')}: {event['ResourceStatusReason']}"
        return "see the stack's events"

    # ------------------------------------------------------------------ delete
    def run_objects_count(self, bucket: str, limit: int = 1000) -> int:
        """How many objects lie under ``runs/`` of ``bucket`` (counting stops at ``limit``)."""
        try:
            page = self.api.call("s3", "list_objects_v2", Bucket=bucket, Prefix=_RUNS_PREFIX, MaxKeys=limit)
        except GpuflowError as exc:
            if error_code(exc) == "NoSuchBucket":  # deleted already (a failed stack deletion got that far)
                return 0
            raise
        return int(page.get("KeyCount", len(page.get("Contents", []))))

    def empty_bucket(self, bucket: str) -> int:
        """Delete every object of ``bucket`` (and every unfinished upload); return how many objects."""
        deleted = 0
        try:
            uploads = self.api.paginate("s3", "list_multipart_uploads", "Uploads", Bucket=bucket)
        except GpuflowError as exc:
            if error_code(exc) == "NoSuchBucket":  # deleted already (a failed stack deletion got that far)
                return 0
            raise
        for upload in uploads:
            self.api.call("s3", "abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        while True:
            page = self.api.call("s3", "list_objects_v2", Bucket=bucket, MaxKeys=1000)
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not keys:
                return deleted
            answer = self.api.call("s3", "delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            errors = answer.get("Errors", [])
            if errors:
                first = errors[0]
                raise CloudError(f"could not delete s3://{bucket}/{first.get('Key')}: {first.get('Code')}",
                                 hint="nothing else was deleted; run `gpuflow setup --delete --force` again")
            deleted += len(keys)

    def delete_account_stack(self, stack_name: str = STACK_NAME) -> None:
        """Delete the stack and wait until it is gone (its bucket must be empty)."""
        self._delete_stack_and_wait(stack_name)

    def _delete_stack_and_wait(self, stack_name: str) -> None:
        self.api.call("cloudformation", "delete_stack", StackName=stack_name)
        view = self._wait_stack_settled(stack_name)
        if view is not None and view.status != "DELETE_COMPLETE":
            reason = self._latest_failure(stack_name)
            raise CloudError(f"deleting the account stack {stack_name} in {self.region} failed ({view.status}: {reason})",
                             hint="run `gpuflow setup --delete` again")


def _changes(described: dict[str, Any]) -> list[ResourceChange]:
    changes = []
    for item in described.get("Changes", []):
        change = item.get("ResourceChange") or {}
        changes.append(ResourceChange(
            action=str(change.get("Action", "?")),
            logical_id=str(change.get("LogicalResourceId", "?")),
            resource_type=str(change.get("ResourceType", "?")),
            replacement=change.get("Replacement"),
        ))
    return changes


__all__ = ["AccountStacks", "StackBusy"]
