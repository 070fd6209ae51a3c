"""The durable sidecar's state, as gpuflow reads it from ``<run>/durable.json`` (written by :mod:`gpuflow.durable.uploader`)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from gpuflow.jobs.rundir import read_json
from gpuflow.transport.base import CommandRunner

DURABLE_FILE = "durable.json"  # = gpuflow.durable.uploader.DURABLE_FILE (a test keeps them equal)


class DurableState(enum.Enum):
    """What the sidecar is doing or how it ended."""

    RESTORING = "restoring"  # before the job: looking for a checkpoint to restore
    WATCHING = "watching"  # uploads up to date
    FAILING = "failing"  # the last upload failed; retrying
    FINISHED = "finished"  # everything that had to go up went up
    FAILED = "failed"  # something was never uploaded (``lost`` says what)


@dataclass(frozen=True)
class Position:
    epoch: int | None
    step: int | None

    def __str__(self) -> str:
        return f"epoch {self.epoch} step {self.step}"

    @classmethod
    def from_dict(cls, data: Any) -> Position | None:
        if not isinstance(data, dict):
            return None
        return cls(data.get("epoch"), data.get("step"))


@dataclass(frozen=True)
class DurableStatus:
    state: DurableState
    url: str | None = None
    committed: Position | None = None  # the newest committed checkpoint of this attempt
    restored: Position | None = None  # the checkpoint this attempt started from
    lost: Position | None = None  # a checkpoint that was never committed
    last_error: str | None = None
    outputs_failed: str | None = None
    failures: int = 0
    bytes_uploaded: int = 0
    checkpoint_bytes: tuple[int, ...] = ()
    upload_seconds: float = 0.0
    uploading: Position | None = None  # a checkpoint whose objects are being sent (not committed yet)

    @classmethod
    def parse(cls, raw: bytes | str | None) -> DurableStatus | None:
        """durable.json's content, or None when there is none (or it is not readable)."""
        if not raw:
            return None
        try:
            data = json.loads(raw)
            state = DurableState(data.get("state"))
        except (ValueError, AttributeError, TypeError):
            return None
        restored = data.get("restored") if isinstance(data.get("restored"), dict) else {}
        outputs = data.get("outputs") if isinstance(data.get("outputs"), dict) else {}
        return cls(
            state=state,
            url=data.get("url"),
            committed=Position.from_dict(data.get("committed")),
            restored=Position.from_dict(restored) if restored.get("restore") == "restored" else None,
            lost=Position.from_dict(data.get("lost")),
            last_error=data.get("last_error"),
            outputs_failed=outputs.get("failed"),
            failures=int(data.get("failures") or 0),
            bytes_uploaded=int(data.get("bytes_uploaded") or 0),
            checkpoint_bytes=tuple(int(n) for n in data.get("checkpoint_bytes") or ()),
            upload_seconds=float(data.get("upload_seconds") or 0.0),
            uploading=Position.from_dict(data.get("uploading")),
        )

    def problem(self) -> str | None:
        """One line naming what was never made durable, or None when nothing was lost."""
        if self.lost is not None:
            since = f"the newest durable checkpoint is {self.committed or self.restored}" \
                if (self.committed or self.restored) else "no checkpoint of this run is durable"
            return (f"the checkpoint at {self.lost} was never uploaded to {self.url} ({self.last_error}); {since}: "
                    f"a restart elsewhere loses the steps after it")
        if self.outputs_failed:
            return f"the outputs were never uploaded to {self.url} ({self.outputs_failed}): `gpuflow pull` them before `down`"
        return None


def read_status(runner: CommandRunner, remote_dir: str) -> DurableStatus | None:
    """The run's durable.json on its node (None: not a durable run, or not readable)."""
    document = read_json(runner, f"{remote_dir}/{DURABLE_FILE}")
    return DurableStatus.parse(json.dumps(document)) if isinstance(document, dict) else None
