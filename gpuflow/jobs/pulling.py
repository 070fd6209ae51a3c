"""Pulling a run's files: outputs, log and manifest, verified by sha256, refusing what could escape; the outcome recorded first."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import stat
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpuflow.errors import NotFound, RemoteCommandFailed, UnsafePath
from gpuflow.jobs import scripts
from gpuflow.jobs.connection import TRANSIENT, Connection
from gpuflow.jobs.local_copy import copy_after_pull, is_unchanged, sha256_file
from gpuflow.jobs.manifest import environment_fields, finish_manifest, with_attempts
from gpuflow.jobs.records import (
    EXIT_CODE_NAME,
    MANIFEST_NAME,
    PID_NAME,
    PULLED_NAMES,
    PulledCopy,
    PullReport,
    RunRecord,
    Say,
    iso,
    quiet,
    save_record,
)
from gpuflow.jobs.rundir import ended_status, read_exit_code
from gpuflow.state import atomic_write_json
from gpuflow.transport.base import CommandRunner
from gpuflow.transport.filestream import PullStream, StreamsPulls


class RunDirectoryGone(NotFound):
    """The instance has no run directory of this run (any more): nothing of it is left to pull."""


def _safe_destination(local_root: Path, relative: str) -> Path | None:
    """Where a remote entry may land locally, or None if it would escape."""
    destination = _safe_destination_lexically(local_root, relative)
    if destination is None:
        return None
    root = local_root.resolve()
    resolved = destination.resolve()
    if resolved != root and root not in resolved.parents:
        return None
    return destination


class _Destinations:
    """:func:`_safe_destination` for many entries: each directory resolved once.

    A leaf that is a symlink (or a directory that is not yet resolved) goes the
    full way; otherwise the leaf lands where its resolved parent says."""

    def __init__(self, local_root: Path) -> None:
        self._root = local_root
        self._safe_parents: dict[str, bool] = {}

    def lookup(self, relative: str) -> tuple[Path | None, bool]:
        """The destination (None: it would escape) and whether a regular file is there
        now (not through a link at its own name) -- one ``lstat`` for both."""
        destination = _safe_destination_lexically(self._root, relative)
        if destination is None:
            return None, False
        parent = relative.rpartition("/")[0]
        safe = self._safe_parents.get(parent)
        if safe is None:
            safe = not parent or _safe_destination(self._root, parent) is not None
            self._safe_parents[parent] = safe
        if not safe:
            return None, False
        try:
            mode = os.lstat(destination).st_mode
        except OSError:
            return destination, False
        if stat.S_ISLNK(mode):
            return _safe_destination(self._root, relative), False
        return destination, stat.S_ISREG(mode)


def _safe_destination_lexically(local_root: Path, relative: str) -> Path | None:
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    if relative.startswith("/") or any(part in ("..", ".", "") for part in relative.split("/")):
        return None
    return local_root / relative  # plain components only: the same path, parsed once


def list_remote_tree(
    runner: CommandRunner, remote_dir: str, names: Sequence[str] = PULLED_NAMES, *, hashed: bool = False
) -> list[dict]:
    """The entries under ``remote_dir`` of ``names`` (never following links): path, kind,
    size, mtime -- and each file's sha256 when ``hashed`` (a pull hashes only the files a
    local copy may already hold, :func:`_remote_hashes`; the others are hashed as they stream)."""
    return _listing(runner, remote_dir, names, None if hashed else ())


def _remote_hashes(runner: CommandRunner, remote_dir: str, paths: Collection[str]) -> dict[str, str]:
    """path -> sha256 on the instance, for those of ``paths`` that are plain files there."""
    return {
        str(entry.get("path")): str(entry["sha256"])
        for entry in _listing(runner, remote_dir, list(paths), paths)
        if entry.get("kind") == "file" and "sha256" in entry
    }


def _listing(
    runner: CommandRunner, remote_dir: str, names: Sequence[str], hash_only: Collection[str] | None
) -> list[dict]:
    if hash_only is None:  # every file hashed
        argv, stdin = [runner.python, "-c", scripts.LIST_TREE_PY, remote_dir, *names], None
    else:
        argv = [runner.python, "-c", scripts.LIST_TREE_PY, remote_dir, "--hash-listed", *names]
        stdin = b"".join(os.fsencode(path) + b"\0" for path in hash_only)
    result = runner.run(argv, stdin=stdin, timeout=600)
    try:
        entries = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise RemoteCommandFailed("the remote run directory listing is unreadable") from exc
    if not isinstance(entries, list):
        raise RemoteCommandFailed("the remote run directory listing is not a list")
    return entries


def pull_files(
    runner: CommandRunner,
    remote_dir: str,
    local_dir: Path,
    *,
    say: Say = quiet,
    entries: list[dict] | None = None,
    previous: PulledCopy | None = None,
    raise_refused: bool = True,
    stream: PullStream | None = None,
) -> PullReport:
    """Copy the run's outputs, log and manifest into ``local_dir``, verified by sha256.

    Refuses (:class:`UnsafePath`) any entry that is a symlink or special file,
    whose path is absolute or has ``..``, or that would resolve outside
    ``local_dir`` — after copying the safe entries (``raise_refused=False``:
    they are only listed in the report's ``refused``).  A file the job rewrites
    while it is being pulled (a checkpoint) is skipped and reported.  A local
    file that already has the remote one's bytes, or is what the ``previous``
    pull made of it (the completed manifest), is not fetched again.

    ``stream`` (a runner's :meth:`pull_session`) carries the hashes and the files in
    the remote process that listed ``entries``; without it, a runner that can
    (:class:`StreamsPulls`) lists and pulls in one such process, others use
    separate commands.
    """
    if entries is None and stream is None and isinstance(runner, StreamsPulls):
        with runner.pull_session(remote_dir, PULLED_NAMES, push=_holds_nothing(local_dir)) as opened:
            return pull_files(
                runner, remote_dir, local_dir, say=say, entries=opened.listing, previous=previous,
                raise_refused=raise_refused, stream=opened,
            )
    local_dir.mkdir(parents=True, exist_ok=True)
    if entries is None:
        entries = stream.listing if stream is not None else list_remote_tree(runner, remote_dir)
    refused: list[str] = []
    fetched: list[str] = []
    unchanged: list[str] = []
    changing: list[str] = []
    total = 0
    safe_destination = _Destinations(local_dir)
    # Each entry's local destination, decided once; and which of them a local file is there for.
    planned = [(entry, str(entry.get("path", ""))) for entry in entries]
    looked_up = [safe_destination.lookup(relative) for _entry, relative in planned]
    destinations = [destination for destination, _here in looked_up]
    held = [here for _destination, here in looked_up]
    # The instance hashes only the files a local copy is there for (is it the same?); every
    # other file is hashed by the streamer as it reads it, and here as it lands.
    unhashed = [
        relative for (entry, relative), here in zip(planned, held)
        if here and entry.get("kind") == "file" and "sha256" not in entry
    ] if stream is None or not stream.pushed else []  # pushed: every file is on its way already
    if unhashed:
        hashes = stream.hashes(unhashed) if stream is not None else _remote_hashes(runner, remote_dir, unhashed)
        for entry, relative in planned:
            if relative in hashes and entry.get("kind") == "file" and "sha256" not in entry:
                entry["sha256"] = hashes[relative]
    wanted: dict[str, tuple[Path, str, dict, int]] = {}  # relative -> (destination, temporary, entry, size)
    items: list[tuple[str, str]] = []  # (relative, local temporary path) for the one stream
    made: set[Path] = set()
    for (entry, relative), destination, here in zip(planned, destinations, held):
        kind = entry.get("kind")
        if destination is None or kind not in ("file", "dir"):
            refused.append(relative)
            continue
        if kind == "dir":
            destination.mkdir(parents=True, exist_ok=True)
            made.add(destination)
            continue
        expected = entry.get("sha256")
        if here and expected is not None and is_unchanged(previous, relative, expected, sha256_file(destination)):
            unchanged.append(relative)
            continue
        if destination.parent not in made:
            destination.parent.mkdir(parents=True, exist_ok=True)
            made.add(destination.parent)
        if relative in wanted:  # listed twice: one copy is enough
            continue
        # Beside its destination (so the same checked directory); the runner replaces,
        # never follows, anything already at that name.
        temporary = os.path.join(os.path.dirname(destination), f".{destination.name}.gpuflow-part")
        wanted[relative] = (destination, temporary, entry, int(entry.get("size", 0)))
        items.append((relative, temporary))
    try:
        # One stream for all of them (over SSH: one channel, hashed as the bytes land).
        for fetched_file in stream.fetch(items) if stream is not None else runner.fetch_files(remote_dir, items):
            destination, temporary, entry, size = wanted[fetched_file.relative]
            # Verified against the listing's sha256 when it has one (the file must not have
            # changed since), else against the hash the streamer took of the bytes it read.
            expected = entry.get("sha256", fetched_file.sha256)
            if fetched_file.sha256 is None or fetched_file.sha256 != expected:
                changing.append(fetched_file.relative)
                continue
            entry["sha256"] = fetched_file.sha256  # what the local copy records
            os.replace(temporary, destination)
            fetched.append(fetched_file.relative)
            total += size
    finally:  # what was not placed (skipped, or the stream broke off) leaves no part file
        placed = set(fetched)
        for relative, temporary_path in items:
            if relative not in placed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary_path)
    report = PullReport(
        local_dir=local_dir,
        fetched=tuple(fetched),
        unchanged=tuple(unchanged),
        changing=tuple(changing),
        bytes_fetched=total,
        refused=tuple(refused),
    )
    if changing:
        say(f"skipped {len(changing)} file(s) the job is still writing: {', '.join(changing[:5])}")
    if raise_refused:
        raise_if_refused(report)
    return report


def raise_if_refused(report: PullReport) -> None:
    """:class:`UnsafePath` naming the entries ``report`` refused, if any."""
    refused = report.refused
    if refused:
        shown = ", ".join(repr(name) for name in refused[:5])
        raise UnsafePath(
            f"refused {len(refused)} remote entr{'y' if len(refused) == 1 else 'ies'} that are symlinks, "
            f"special files or escape {report.local_dir}: {shown}",
            hint="the other files were pulled; write plain files under $GPUFLOW_OUTPUT_DIR",
        )


def _finalize_local(
    local_dir: Path,
    environment: dict[str, Any] | None,
    exit_code: int | None,
    job_started_at: str | None,
    ended_at: str | None,
    record: RunRecord | None = None,
) -> None:
    """Complete the pulled manifest with the environment facts, job times, exit code, duration and cost.

    When the instance's manifest did not arrive as a JSON object (refused as a
    symlink, or rewritten by the job) and the job has ended, a manifest with
    what ``record`` knows still records the outcome."""
    manifest_path = local_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        if record is None or exit_code is None:
            return
        manifest = {
            "run_id": record.run_id,
            "command": list(record.command),
            "module": record.module,
            "cluster": record.cluster,
            "started_at": record.started_at,
        }
    if environment:
        manifest.update(environment_fields(environment))
    if record is not None and record.resumes:  # each `gpuflow run --resume`, oldest first
        manifest["resumes"] = [resume.to_dict() for resume in record.resumes]
    if exit_code is not None and ended_at is not None:
        manifest = finish_manifest(
            manifest, job_started_at=job_started_at, ended_at=ended_at, exit_code=exit_code,
            earlier_seconds=_earlier_seconds(record) if record is not None else None,
        )
    if record is not None:
        manifest = with_attempts(manifest, record.attempts)
    atomic_write_json(manifest_path, manifest, mode=0o644)


def _earlier_seconds(record: RunRecord) -> float | None:
    """What a resumed run's job ran before its last resume (None: never resumed, or unknown)."""
    return record.resumes[-1].previous_duration_seconds if record.resumes else None


def _instance_time(entries: list[dict], name: str) -> str | None:
    """The mtime of run-directory file ``name``, on the instance's clock (None if absent).

    The supervisor writes ``job.pid`` as the job starts and ``exit_code`` as it ends.
    """
    for entry in entries:
        if entry.get("path") == name and entry.get("mtime") is not None:
            moment = datetime.datetime.fromtimestamp(float(entry["mtime"]), datetime.timezone.utc)
            return iso(moment)
    return None


def _read_environment(runner: CommandRunner, remote_dir: str, timeout: float = 30) -> dict[str, Any] | None:
    """The supervisor's environment probe, or None when there is none: one command, which waits
    on the target while the probe still runs (the job's exit code does not wait for it, so a
    short job's pull usually comes first), at most ``timeout``, then answers with its document."""
    result = runner.run_script(scripts.await_environment_script(remote_dir, timeout, show=True),
                               timeout=timeout + 30, check=False)
    try:
        document = json.loads(result.stdout) if result.stdout.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _record_outcome(
    record: RunRecord,
    *,
    exit_code: int,
    job_started_at: str | None,
    ended_at: str | None,
    environment: dict[str, Any] | None,
    home: Path | None,
    runner: CommandRunner,
) -> RunRecord:
    """Write the job's outcome to its record (before any file is pulled)."""
    duration = None
    if job_started_at is not None and ended_at is not None:
        duration = finish_manifest(
            {}, job_started_at=job_started_at, ended_at=ended_at, exit_code=exit_code,
            earlier_seconds=_earlier_seconds(record),
        )["duration_seconds"]
    record = record.with_status(
        ended_status(runner, record.remote_dir, exit_code),
        ended_at=ended_at or record.ended_at,
        job_started_at=job_started_at or record.job_started_at,
        python=(environment or {}).get("python") or record.python,
        duration_seconds=duration if duration is not None else record.duration_seconds,
        lost_reason=None,
    )
    save_record(record, home)
    return record


def _holds_nothing(local_dir: Path) -> bool:
    """Whether no pulled name is here yet (a first pull): then nothing needs comparing, and
    the streamer may send every file right after its listing (``push``)."""
    return not any(os.path.lexists(local_dir / name) for name in PULLED_NAMES)


@contextlib.contextmanager
def _stream_for(
    runner: CommandRunner, remote_dir: str, names: Sequence[str], local_dir: Path
) -> Iterator[PullStream | None]:
    """The runner's one-process pull (:class:`StreamsPulls`), or None: separate commands."""
    if isinstance(runner, StreamsPulls):
        with runner.pull_session(remote_dir, names, push=_holds_nothing(local_dir)) as stream:
            yield stream
    else:
        yield None


def pull_run(
    record: RunRecord, runner: CommandRunner, *, home: Path | None = None, say: Say = quiet,
    exit_code: int | None = None,
) -> tuple[RunRecord, PullReport]:
    """Pull a run's files (while it runs: the latest outputs) and update its record.
    ``exit_code``: the run directory's exit code when the caller has just read it (the follow
    that saw the job end): not read again.

    The job's outcome (exit code, start and end, Python, duration) is recorded
    first, and completes the local manifest whatever the pull finds (a refused
    entry raises :class:`UnsafePath` after the safe files are pulled).
    """
    local_dir = Path(record.local_dir)
    if exit_code is None:
        exit_code = read_exit_code(runner, record.remote_dir)
    # One listing serves both: the files to pull, and the job's start and end times
    # (job.pid's and exit_code's mtimes, both on the instance's clock); over SSH it comes
    # from the one remote process that then sends the hashes and the files.
    with _stream_for(runner, record.remote_dir, (*PULLED_NAMES, PID_NAME, EXIT_CODE_NAME), local_dir) as stream:
        if stream is not None:
            listing = stream.listing
        else:
            listing = list_remote_tree(runner, record.remote_dir, (*PULLED_NAMES, PID_NAME, EXIT_CODE_NAME))
        if not listing:  # not even the manifest written at start: the run directory is gone
            raise RunDirectoryGone(f"its run directory is gone from cluster {record.cluster}")
        job_started_at = _instance_time(listing, PID_NAME)
        ended_at = _instance_time(listing, EXIT_CODE_NAME) if exit_code is not None else None
        environment = _read_environment(runner, record.remote_dir)
        if exit_code is not None:
            record = _record_outcome(
                record, exit_code=exit_code, job_started_at=job_started_at, ended_at=ended_at,
                environment=environment, home=home, runner=runner,
            )
        entries = [entry for entry in listing if entry.get("path") not in (PID_NAME, EXIT_CODE_NAME)]
        try:
            report = pull_files(
                runner, record.remote_dir, local_dir, say=say, entries=entries, previous=record.pulled,
                raise_refused=False, stream=stream,
            )
        finally:  # also when the pull broke off: the manifest pulled with the other files is completed
            _finalize_local(local_dir, environment, exit_code, job_started_at, ended_at, record)
    # What is here now, and whether it is all the run has: a repeated pull, and `logs` or
    # `pull` once the cluster is gone, go by it.
    record = replace(record, pulled=copy_after_pull(entries, report, local_dir, job_ended=exit_code is not None))
    save_record(record, home)
    raise_if_refused(report)
    say(
        f"pulled {len(report.fetched)} file(s), {report.bytes_fetched:,} bytes "
        f"({len(report.unchanged)} unchanged) into {local_dir}"
    )
    return record, report


def pull_with_reconnect(
    connection: Connection, record: RunRecord, *, home: Path | None, say: Say, exit_code: int | None = None
) -> tuple[RunRecord, PullReport]:
    """:func:`pull_run` on ``connection``, reconnecting after a drop (a few times)."""
    for _attempt in range(5):
        try:
            return pull_run(record, connection.runner, home=home, say=say, exit_code=exit_code)
        except TRANSIENT as exc:
            connection.reconnect(exc)
    return pull_run(record, connection.runner, home=home, say=say, exit_code=exit_code)
