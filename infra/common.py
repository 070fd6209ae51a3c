"""Small local helpers with one home, shared by infra and gpuflow: safe names, atomic writes, live pids.

:mod:`gpuflow.state` re-exports them; infra (user-data, the sandbox server)
uses them without importing gpuflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from infra.errors import UsageError

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def validate_name(name: str, what: str = "name") -> str:
    """Names become file names, AWS tag values and remote directory names:
    allow only letters, digits, '.', '_' and '-' (max 63, not starting with
    a separator)."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or name in (".", ".."):
        raise UsageError(
            f"invalid {what} {name!r}",
            hint="use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def process_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists on this machine (used to tell a
    state record of a still-running gpuflow process from a stale one)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new
    content, never a mix; survives a crash at any point."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # Make the rename itself durable.
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def atomic_write_json(path: Path, document: Any, mode: int = 0o600) -> None:
    atomic_write_bytes(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode(), mode)


__all__ = ["atomic_write_bytes", "atomic_write_json", "process_alive", "validate_name"]
