"""The ``gpuflow:*`` tag names on everything gpuflow creates, and AWS's tag-list shape.

AWS tags are the source of truth: ``down`` and ``reap`` find what a crashed or
forgotten ``up`` left by these tags, without any local state.
"""

from __future__ import annotations

from collections.abc import Iterable

TAG_CLUSTER = "gpuflow:cluster"
TAG_OWNER = "gpuflow:owner"  # user@host, for people reading the console
TAG_OWNER_ID = "gpuflow:owner-id"  # the creating gpuflow home's id: what `reap` goes by
TAG_CREATED_AT = "gpuflow:created-at"
TAG_MANAGED = "gpuflow:managed"
TAG_LAUNCH = "gpuflow:launch-id"  # one per `up` invocation: what rollback may delete
TAG_EXPIRES_AT = "gpuflow:expires-at"  # created-at + --max-hours: `reap --expired` takes only what is past it


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    """``{"k": "v"}`` as AWS's ``[{"Key": "k", "Value": "v"}]``."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def tag_dict(tags: Iterable[dict[str, str]] | None) -> dict[str, str]:
    """AWS's ``[{"Key": "k", "Value": "v"}]`` (or None) as ``{"k": "v"}``."""
    return {tag["Key"]: tag["Value"] for tag in tags or ()}


__all__ = [
    "TAG_CLUSTER",
    "TAG_CREATED_AT",
    "TAG_EXPIRES_AT",
    "TAG_LAUNCH",
    "TAG_MANAGED",
    "TAG_OWNER",
    "TAG_OWNER_ID",
    "tag_dict",
    "tag_list",
]
