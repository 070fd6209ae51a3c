"""The local transport: "the instance" is a directory on this machine.

Used by the sandbox cloud and by tests: the same protocol as SSH, so the run,
sync and pull code paths are the ones used against a real instance.  Commands
run through ``bash -c`` with the same quoting as over SSH.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from gpuflow.errors import InstanceGone, RemoteCommandFailed, UnreachableHost
from gpuflow.records import CommandResult
from gpuflow.state import atomic_write_bytes
from gpuflow.transport.base import base_python_lookup, env_prefix, quote_argv
from gpuflow.transport.filestream import Fetched


class LocalRunner:
    """Runs commands with ``root`` as the target's gpuflow base directory.

    The target is this machine: gpuflow's probes and jobs use the interpreter
    running gpuflow (it has the packages and starts at once) unless told otherwise.
    """

    def __init__(self, root: Path | str, *, python: str = sys.executable, job_pythons: tuple[str, ...] = ()) -> None:
        self._root = Path(root).resolve()
        self._root.mkdir(parents=True, exist_ok=True)
        self._python = python
        self._job_pythons = tuple(job_pythons)

    @property
    def base_dir(self) -> str:
        return str(self._root)

    @property
    def python(self) -> str:
        return self._python

    @property
    def job_pythons(self) -> tuple[str, ...]:
        return self._job_pythons

    @property
    def base_python(self) -> str | None:
        found = self.run_script(base_python_lookup(self._job_pythons, self._python), check=False).text().strip().splitlines()
        return found[-1] if found else None

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        command = env_prefix(env) + quote_argv(argv)
        if cwd is not None:
            command = f"cd {quote_argv([cwd])} && {command}"
        return self.run_script(command, stdin=stdin, timeout=timeout, check=check)

    def run_script(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        if not self._root.is_dir():
            # The target's directory is its disk: gone means the (sandbox) instance
            # was terminated.  Never re-created here: a follower must see it gone.
            raise InstanceGone(f"the local target {self._root} is gone")
        full_env = dict(os.environ)
        full_env.update(env or {})
        try:
            completed = subprocess.run(
                ["bash", "-c", script],
                input=stdin if stdin is not None else b"",
                capture_output=True,
                cwd=self._root,
                env=full_env,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise UnreachableHost(f"command timed out after {timeout:g}s on the local target") from exc
        result = CommandResult(completed.returncode, completed.stdout, completed.stderr)
        if check and not result.ok:
            raise RemoteCommandFailed(
                f"command failed with exit code {result.exit_code}: "
                f"{result.stderr.decode(errors='replace').strip()[-300:]}"
            )
        return result

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        atomic_write_bytes(Path(remote_path), data, mode)

    def read_from(self, remote_path: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        try:
            with open(remote_path, "rb") as handle:
                handle.seek(offset)
                return handle.read(limit)
        except FileNotFoundError:
            return b""

    def get_file(self, remote_path: str, local_path: str) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote_path, local_path)

    def fetch_files(self, remote_dir: str, items: Sequence[tuple[str, str]]) -> Iterator[Fetched]:
        """One :meth:`get_file` per item (the files are on this disk already), hashed after the copy."""
        root = os.path.realpath(remote_dir)
        for relative, temporary in items:
            source = Path(remote_dir, relative)
            # No component may be a link (realpath would differ) or `..`.
            if os.path.realpath(source) != os.path.join(root, relative) or not source.is_file():
                yield Fetched(relative, None, "missing, not a regular file, or reached through a link")
                continue
            with contextlib.suppress(FileNotFoundError):  # a planted link there is replaced, not followed
                os.unlink(temporary)
            before = source.stat()
            self.get_file(str(source), temporary)
            after = source.stat()
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                yield Fetched(relative, None, "it changed while being read")
                continue
            digest = _sha256(temporary)
            if digest != _sha256(source):  # the streamer's check: what landed is what was read
                yield Fetched(relative, None, "its bytes arrived damaged")
                continue
            yield Fetched(relative, digest)

    def close(self) -> None:
        return None


def _sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
