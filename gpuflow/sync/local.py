"""Sync to a directory on this machine (the sandbox's instances, tests): list it, then copy into it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from gpuflow.errors import SecurityError
from gpuflow.sync.plan import DestinationEntry, DestinationState, SyncPlan
from gpuflow.sync.progress import Progress
from gpuflow.sync.transfer import COPY_CHUNK


def list_local_destination(directory: Path) -> DestinationState:
    """The same listing the SSH probe produces, for a local directory."""
    if not directory.is_dir():
        return DestinationState(exists=False)
    entries: dict[str, DestinationEntry] = {}
    pending = [""]
    while pending:
        relative_directory = pending.pop()
        absolute_directory = directory / relative_directory if relative_directory else directory
        with os.scandir(absolute_directory) as iterator:
            for item in iterator:
                relative_path = f"{relative_directory}/{item.name}" if relative_directory else item.name
                status = item.stat(follow_symlinks=False)
                if stat.S_ISLNK(status.st_mode):
                    entries[relative_path] = DestinationEntry(
                        "link", 0, status.st_mtime_ns, 0, os.readlink(item.path)
                    )
                elif stat.S_ISDIR(status.st_mode):
                    entries[relative_path] = DestinationEntry("dir", 0, status.st_mtime_ns)
                    pending.append(relative_path)
                elif stat.S_ISREG(status.st_mode):
                    entries[relative_path] = DestinationEntry(
                        "file", status.st_size, status.st_mtime_ns, stat.S_IMODE(status.st_mode)
                    )
                else:
                    entries[relative_path] = DestinationEntry("other", 0, status.st_mtime_ns)
    return DestinationState(exists=True, entries=entries, has_rsync=False)


def _inside(directory_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == directory_real or real.startswith(directory_real + os.sep)


def _check_inside(destination: Path, destination_real: str, directory: Path) -> None:
    """Refuse a directory whose nearest existing ancestor resolves outside the
    destination (checked before ``mkdir`` could follow a planted link)."""
    existing_ancestor = directory
    while not existing_ancestor.exists() and existing_ancestor != destination:
        existing_ancestor = existing_ancestor.parent
    if not _inside(destination_real, str(existing_ancestor)):
        raise SecurityError(f"refusing to write into {directory}: it resolves outside {destination}")


def apply_local(source: Path, destination: Path, plan: SyncPlan, progress: Progress) -> None:
    """Delete, create the planned (empty) directories, then copy each planned
    entry via a temp file + rename; never writes through a link (every parent
    is checked to resolve inside)."""
    destination.mkdir(parents=True, exist_ok=True)
    destination_real = os.path.realpath(destination)
    for path in plan.to_delete:
        target = destination / path
        if not _inside(destination_real, os.path.dirname(target)):
            raise SecurityError(f"refusing to delete {target}: it resolves outside {destination}")
        try:
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            else:
                target.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a directory still holding ignored files stays
    for path in plan.to_create:
        target = destination / path
        _check_inside(destination, destination_real, target)
        target.mkdir(parents=True, exist_ok=True)
    for entry in plan.to_send:
        target = destination / entry.path
        _check_inside(destination, destination_real, target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / f".{target.name}.gpuflow-sync.tmp"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        if entry.kind == "link":
            os.symlink(entry.link_target or "", temporary)
        else:
            with open(source / entry.path, "rb") as reader, open(temporary, "wb") as writer:
                while True:
                    chunk = reader.read(COPY_CHUNK)
                    if not chunk:
                        break
                    writer.write(chunk)
                    progress.advance(len(chunk))
            os.chmod(temporary, entry.mode)
            os.utime(temporary, ns=(entry.mtime_ns, entry.mtime_ns))
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # planned for deletion but still held ignored files
        os.replace(temporary, target)
