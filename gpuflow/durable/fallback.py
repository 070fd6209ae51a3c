"""``gpuflow logs`` / ``gpuflow pull`` when the instance is gone: the run's durable copy in S3.

Read with the user's own credentials (boto3, the cluster's profile; the sandbox's
loopback S3 for a sandbox run), only under the run's prefix.  ``pull`` takes the
outputs named by ``outputs/COMMIT.json``, verifies each against its sha256 and
places it atomically, refusing any name that would escape the run's directory —
the rules of :mod:`gpuflow.jobs.pulling`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpuflow.durable import COMMIT_NAME, LOG_KEY, MANIFEST_KEY, OUTPUTS, uploader
from gpuflow.durable.ref import DurableRef
from gpuflow.errors import GpuflowError, UnsafePath
from gpuflow.jobs.local_copy import sha256_file
from gpuflow.jobs.pulling import _safe_destination
from gpuflow.config import gpuflow_home

Reader = Callable[[str], bytes | None]  # key -> the object's bytes, None when there is none


def sandbox_endpoint() -> str | None:
    """The sandbox cloud's loopback endpoint (its S3 included)."""
    from infra.aws import sandbox_endpoint_url

    return sandbox_endpoint_url(gpuflow_home())


def s3_reader(ref: DurableRef) -> Reader:
    """Reads objects under ``ref``'s prefix (and nowhere else) with boto3."""
    from infra.aws.client import AwsApi, AwsTarget, error_code

    endpoint = sandbox_endpoint() if ref.sandbox else None
    api = AwsApi(AwsTarget(region=ref.region, profile=ref.profile, endpoint_url=endpoint, sandbox=ref.sandbox))
    client = api.client("s3")

    def read(key: str) -> bytes | None:
        if not key.startswith(ref.prefix):
            raise ValueError(f"{key} is outside {ref.prefix}")
        try:
            return client.get_object(Bucket=ref.bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore's errors: a missing object is None, anything else says why
            if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise GpuflowError(f"could not read s3://{ref.bucket}/{key}: {exc}",
                               hint="the run's durable copy needs S3 read access to its bucket") from exc

    return read


def read_log(ref: DurableRef, reader: Reader | None = None) -> bytes | None:
    """The run's job log as last uploaded (every 30 s and at the end), or None."""
    return (reader or s3_reader(ref))(ref.prefix + LOG_KEY)


def read_exit_code(ref: DurableRef, reader: Reader | None = None) -> int | None:
    """The job's exit code as its outputs' COMMIT.json names it (None: not finished, or not uploaded)."""
    raw = (reader or s3_reader(ref))(ref.prefix + OUTPUTS + COMMIT_NAME)
    try:
        code = uploader.checked_commit(raw).get("exit_code") if raw else None
    except ValueError:
        return None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def pull_outputs(ref: DurableRef, local_dir: Path, reader: Reader | None = None) -> tuple[list[str], list[str]]:
    """The committed outputs (and the log and manifest) into ``local_dir``: (fetched, unchanged).

    Refuses (UnsafePath) a name that would escape ``local_dir`` and (GpuflowError) a file whose
    sha256 is not the one COMMIT.json names; nothing is placed before it is verified."""
    read = reader or s3_reader(ref)
    raw = read(ref.prefix + OUTPUTS + COMMIT_NAME)
    if raw is None:
        raise GpuflowError(f"{ref.url} holds no committed outputs (the job did not finish uploading them)",
                           hint=f"`gpuflow logs` shows what the job did; its checkpoints are under {ref.url}checkpoints/")
    try:
        commit = uploader.checked_commit(raw)
    except ValueError as exc:
        raise GpuflowError(f"{ref.url}{OUTPUTS}{COMMIT_NAME} is not readable: {exc}") from exc
    local_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, tuple[str, dict[str, Any] | None]] = {
        f"outputs/{name}": (ref.prefix + OUTPUTS + name, entry) for name, entry in commit["files"].items()
    }
    wanted["job.log"] = (ref.prefix + LOG_KEY, None)
    wanted["manifest.json"] = (ref.prefix + MANIFEST_KEY, None)
    fetched: list[str] = []
    unchanged: list[str] = []
    for relative, (key, entry) in sorted(wanted.items()):
        destination = _safe_destination(local_dir, relative)
        if destination is None:
            raise UnsafePath(f"{ref.url}: refused {relative!r}: it would land outside {local_dir}")
        if entry is not None and destination.is_file() and sha256_file(destination) == entry["sha256"]:
            unchanged.append(relative)
            continue
        data = read(key)
        if data is None and entry is None:
            continue  # log / manifest: optional
        if entry is not None:
            try:
                data = uploader.verified(relative, data, entry)
            except ValueError as exc:
                raise GpuflowError(f"{ref.url}: {exc}; nothing of it was placed",
                                   hint="the durable copy is damaged: run the job again") from exc
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.gpuflow-tmp-{os.getpid()}")
        temporary.write_bytes(data or b"")
        os.replace(temporary, destination)
        fetched.append(relative)
    return fetched, unchanged

