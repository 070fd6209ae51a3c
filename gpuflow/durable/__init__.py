"""Durable runs: a run's checkpoints, log and outputs kept in the account's S3 bucket, so a run outlives its instance.

This package is the use case behind ``gpuflow setup`` (the account stack that
owns the bucket and the instances' role), the on-instance uploads, ``logs`` /
``pull`` falling back to S3, and ``run --recover`` / ``resume``.

The contract every part shares (the layout below is what a reader restores from):

* the store is found from the account stack's outputs in the cluster's region
  (:class:`DurableStore`); without the stack nothing is durable and everything
  works as before;
* a run lives under ``s3://<bucket>/runs/<owner-id>/<run-id>/`` (:func:`run_prefix`);
* ``checkpoints/<seq>/`` holds one checkpoint's files (``seq`` zero-padded to 6
  digits, increasing) and, written last, ``checkpoints/<seq>/COMMIT.json``
  (``{"format": 1, "seq": N, "epoch": E, "step": S, "attempt": A,
  "files": {name: {"size": BYTES, "sha256": HEX}}}``): a reader only ever restores
  a checkpoint whose COMMIT.json exists and whose files match it;
* ``log/job.log`` is the job's log (uploaded every 30 s and at the end);
* ``outputs/`` holds the job's outputs at the end, ``outputs/COMMIT.json`` last
  (same ``files`` map);
* ``manifest.json`` is the run's manifest (every attempt).
"""

from __future__ import annotations

from dataclasses import dataclass

RUNS_PREFIX = "runs/"
CHECKPOINTS = "checkpoints/"
COMMIT_NAME = "COMMIT.json"
LOG_KEY = "log/job.log"
OUTPUTS = "outputs/"
MANIFEST_KEY = "manifest.json"
SEQ_DIGITS = 6


@dataclass(frozen=True)
class DurableStore:
    """Where a region's durable runs live: the account stack's bucket and the instances' role."""

    region: str
    stack_name: str
    bucket: str
    role_name: str
    instance_profile_name: str
    instance_profile_arn: str


def run_prefix(owner_id: str, run_id: str) -> str:
    """The key prefix (ending in ``/``) of one run's objects in the bucket."""
    return f"{RUNS_PREFIX}{owner_id}/{run_id}/"


def checkpoint_prefix(owner_id: str, run_id: str, seq: int) -> str:
    """The key prefix of checkpoint number ``seq`` of a run."""
    return f"{run_prefix(owner_id, run_id)}{CHECKPOINTS}{seq:0{SEQ_DIGITS}d}/"
