"""The account stack: one CloudFormation stack per region holding what durable runs need (no boto3 here).

``infra/account-stack.json`` is the template: an S3 bucket for runs' checkpoints,
logs and outputs (default encryption, every public access blocked, a bucket
policy refusing requests without TLS, a lifecycle rule expiring ``runs/`` after
``RetentionDays``), and an IAM role + instance profile for gpuflow's instances
whose only policy allows reading, writing and listing under the bucket's
``runs/`` prefix.  :mod:`infra.aws.stack` deploys, describes and deletes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STACK_NAME = "gpuflow-account"
TEMPLATE_PATH = Path(__file__).resolve().parent / "account-stack.json"
DEFAULT_RETENTION_DAYS = 30
MIN_RETENTION_DAYS = 1
MAX_RETENTION_DAYS = 3650
RETENTION_PARAMETER = "RetentionDays"
# The names the template gives (IAM names are global: the region keeps one stack per region apart).
ROLE_NAME_PREFIX = "gpuflow-instance-"
BUCKET_NAME_PREFIX = "gpuflow-runs-"
# The template's logical ids and outputs.
BUCKET_RESOURCE = "RunsBucket"
ROLE_RESOURCE = "InstanceRole"
PROFILE_RESOURCE = "InstanceProfile"
OUTPUT_BUCKET = "BucketName"
OUTPUT_ROLE = "RoleName"
OUTPUT_PROFILE_NAME = "InstanceProfileName"
OUTPUT_PROFILE_ARN = "InstanceProfileArn"
# The stack's template creates IAM resources with names: CloudFormation wants this acknowledged.
CAPABILITIES = ("CAPABILITY_NAMED_IAM",)


def template_body() -> str:
    """The template's text, as sent to CloudFormation."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def template() -> dict[str, Any]:
    return json.loads(template_body())


def role_name(region: str) -> str:
    return f"{ROLE_NAME_PREFIX}{region}"


def bucket_name(account_id: str, region: str) -> str:
    return f"{BUCKET_NAME_PREFIX}{account_id}-{region}"


def instance_role_policy() -> dict[str, Any]:
    """The instances' role's only policy document, as the template writes it (``Fn::Sub`` unresolved)."""
    [policy] = template()["Resources"][ROLE_RESOURCE]["Properties"]["Policies"]
    return policy["PolicyDocument"]


@dataclass(frozen=True)
class ResourceChange:
    """One line of a change set: ``action`` Add | Modify | Remove | Import | Dynamic."""

    action: str
    logical_id: str
    resource_type: str
    replacement: str | None = None  # True | False | Conditional (Modify only)

    def describe(self) -> str:
        replace = f" (replacement: {self.replacement})" if self.replacement not in (None, "", "False") else ""
        return f"{self.action} {self.logical_id} ({self.resource_type}){replace}"


@dataclass(frozen=True)
class StackPlan:
    """A change set made and described, not yet executed."""

    region: str
    stack_name: str
    change_set_name: str
    kind: str  # CREATE | UPDATE
    changes: tuple[ResourceChange, ...]
    parameters: tuple[tuple[str, str], ...]
    no_changes: bool = False
    replaces_failed_stack: bool = False  # a ROLLBACK_COMPLETE stack of an earlier failed create is deleted first


@dataclass(frozen=True)
class AccountStackView:
    """The stack as CloudFormation describes it.  ``usable``: deployed and complete
    (its bucket and role exist); the outputs are set only then."""

    region: str
    stack_name: str
    stack_id: str
    status: str
    usable: bool
    retention_days: int | None = None
    bucket: str | None = None
    role_name: str | None = None
    instance_profile_name: str | None = None
    instance_profile_arn: str | None = None


# Complete states in which the stack's resources exist as its template says.
USABLE_STATES = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE",
                           "IMPORT_ROLLBACK_COMPLETE"})
# Operations still running: another setup (or the console) is at work on the stack.
BUSY_SUFFIX = "_IN_PROGRESS"


__all__ = [
    "AccountStackView",
    "CAPABILITIES",
    "DEFAULT_RETENTION_DAYS",
    "ResourceChange",
    "STACK_NAME",
    "StackPlan",
    "TEMPLATE_PATH",
    "bucket_name",
    "instance_role_policy",
    "role_name",
    "template",
    "template_body",
]
