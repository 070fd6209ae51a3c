"""Where one run's durable copy lives, as its local record keeps it (so ``logs`` / ``pull`` find it after ``down``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gpuflow.durable import DurableStore, run_prefix


@dataclass(frozen=True)
class DurableRef:
    """``s3://<bucket>/<prefix>`` of one run, the bucket's region, and how to reach it from here
    (the sandbox's loopback S3, or AWS with the cluster's profile)."""

    bucket: str
    prefix: str  # runs/<owner-id>/<run-id>/
    region: str
    sandbox: bool = False
    profile: str | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @classmethod
    def for_run(cls, store: DurableStore, owner_id: str, run_id: str, *, sandbox: bool = False,
                profile: str | None = None) -> DurableRef:
        return cls(bucket=store.bucket, prefix=run_prefix(owner_id, run_id), region=store.region, sandbox=sandbox,
                   profile=profile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DurableRef:
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})
