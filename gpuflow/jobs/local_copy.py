"""A run's local copy in ``runs/<run-id>/``: what the last pull left there, whether it is still intact, and what is missing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from gpuflow.jobs.records import MANIFEST_NAME, PulledCopy, PulledFile, PullReport, RunRecord


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_digest(path: Path) -> str | None:
    """The sha256 of a plain local file (None when it is missing, a symlink or unreadable)."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return sha256_file(path)
    except OSError:
        return None


def is_unchanged(previous: PulledCopy | None, relative: str, remote_sha256: str, local_sha256: str) -> bool:
    """Whether the local file (of digest ``local_sha256``) already is the instance's file of
    digest ``remote_sha256``: the same bytes, or what the last pull made of that very file
    (the manifest, which gpuflow completes locally) and nobody changed since."""
    if local_sha256 == remote_sha256:
        return True
    pulled = previous.file(relative) if previous is not None else None
    return pulled is not None and pulled.remote_sha256 == remote_sha256 and pulled.local_sha256 == local_sha256


def copy_after_pull(
    entries: Sequence[dict], report: PullReport, local_dir: Path, *, job_ended: bool
) -> PulledCopy:
    """The local copy a pull left: each file it fetched or found unchanged, with the digest
    it has on the instance and here (read again only for the manifest, which the pull
    completes after copying).  Complete when the job had ended and every file of the
    listing arrived — nothing skipped as still being written, nothing refused."""
    remote = {str(entry.get("path")): str(entry.get("sha256", "")) for entry in entries if entry.get("kind") == "file"}
    arrived = [path for path in (*report.fetched, *report.unchanged) if path in remote]
    files = []
    for path in sorted(arrived):
        local = remote[path]
        if path == MANIFEST_NAME:
            local = _local_digest(local_dir / MANIFEST_NAME) or ""
        files.append(PulledFile(path=path, remote_sha256=remote[path], local_sha256=local))
    complete = job_ended and not report.changing and not report.refused and set(arrived) == set(remote)
    return PulledCopy(files=tuple(files), complete=complete)


def missing_locally(record: RunRecord, paths: Iterable[str] | None = None) -> list[str]:
    """Which files of the run's local copy (or of ``paths``) are not in ``local_dir`` as
    pulled: deleted or changed since; of ``paths`` no pull recorded, those not there."""
    copy = record.pulled or PulledCopy()
    wanted = list(paths) if paths is not None else [pulled.path for pulled in copy.files]
    local_dir = Path(record.local_dir)
    missing = []
    for relative in wanted:
        pulled = copy.file(relative)
        digest = _local_digest(local_dir.joinpath(*relative.split("/")))
        if digest is None or (pulled is not None and digest != pulled.local_sha256):
            missing.append(relative)
    return missing


def holds_everything(record: RunRecord, paths: Iterable[str] | None = None) -> bool:
    """Whether ``local_dir`` holds, intact, all the finished run has (or all of ``paths``):
    nothing there can be pulled again that is not already here."""
    return (
        record.finished
        and record.pulled is not None
        and record.pulled.complete
        and not missing_locally(record, paths)
    )
