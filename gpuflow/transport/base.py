"""The command-runner protocol shared by the local and the SSH transport.

Rules every runner keeps:

* ``run`` takes an argv list and quotes every element (``shlex.join``) before
  anything reaches a remote shell: a user's argument is never interpreted.
* ``run_script`` is for scripts gpuflow itself writes; any user-supplied value
  inside one must have gone through ``shlex.quote`` first.
* ``base_dir`` is the absolute directory on the target under which gpuflow
  keeps everything (code, data, runs, environments).  Paths given to the file
  methods are absolute target paths.
* ``python`` and ``job_pythons`` say which interpreters the target offers; they
  are decided where the runner is created (this machine's interpreter for the
  local target, ``python3`` and the Deep Learning AMI's for an instance), so
  no use case asks what kind of runner it holds.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from gpuflow.records import CommandResult
from gpuflow.transport.filestream import Fetched
from gpuflow.transport.quoting import quote_argv  # noqa: F401 - re-exported: the one quoting path




# The one remote lock, for scripts gpuflow runs on a target (the virtualenv preparation, the
# sync exchange): a shell function, put before the script that calls it.  ``take_lock FILE
# SECONDS WAIT_LINE`` holds an exclusive flock(1) on FILE through descriptor 9 until the script
# exits (the kernel drops it if the script dies); if another holds it, prints WAIT_LINE (when not
# empty) once, then waits SECONDS (empty: without limit).  Non-zero when it could not take it.
# The local counterpart is :func:`gpuflow.state.locked`.
TAKE_LOCK_SHELL_FUNCTION = r"""take_lock() {
  exec 9>>"$1" || return 1
  flock -n 9 && return 0
  [ -z "$3" ] || printf '%s\n' "$3"
  if [ -n "$2" ]; then flock -w "$2" 9; else flock 9; fi
}
"""


def base_python_lookup(candidates: Sequence[str], fallback: str) -> str:
    """A POSIX shell fragment printing the first executable of ``candidates``, else where
    ``fallback`` is found (nothing if nowhere); always exits 0.  Last in the script it ends."""
    found = "".join(f"[ -x {quote_argv([c])} ] && {{ echo {quote_argv([c])}; exit 0; }}; " for c in candidates)
    return f"{found}command -v {quote_argv([fallback])} || true"


def env_prefix(env: Mapping[str, str] | None) -> str:
    """``env K=V ...`` with every value quoted, or '' when no variables."""
    if not env:
        return ""
    for key in env:
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"invalid environment variable name {key!r}")
    return "env " + " ".join(f"{key}={shlex.quote(str(value))}" for key, value in env.items()) + " "


@runtime_checkable
class CommandRunner(Protocol):
    """Run commands and move bytes on one target machine."""

    @property
    def base_dir(self) -> str:
        """Absolute path on the target under which gpuflow keeps its files."""

    @property
    def python(self) -> str:
        """The interpreter gpuflow's own probes run with on the target (a path, or a name on PATH)."""

    @property
    def job_pythons(self) -> tuple[str, ...]:
        """Interpreters a job starts from when present on the target, in order of preference,
        before :attr:`python` (e.g. the Deep Learning AMI's TensorFlow Python)."""

    @property
    def base_python(self) -> str | None:
        """The first of :attr:`job_pythons` present on the target, else where :attr:`python`
        is (:func:`base_python_lookup`); None when neither is found.  Over SSH it comes with
        the connection's first command: asking costs no round trip of its own."""

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
        """Run argv (each element quoted) and wait; raise on non-zero exit when check."""

    def run_script(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run a gpuflow-written bash script (``bash -c``)."""

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``remote_path`` atomically (temp file + rename)."""

    def read_from(self, remote_path: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes of ``remote_path`` starting at byte ``offset``;
        b'' at end of file.  Used to stream logs resumably."""

    def get_file(self, remote_path: str, local_path: str) -> None:
        """Copy one remote file to a local path."""

    def fetch_files(self, remote_dir: str, items: Sequence[tuple[str, str]]) -> Iterator[Fetched]:
        """Copy many files of ``remote_dir``: each (relative path, local temporary path)
        of ``items`` in order, yielding the sha256 of what landed at the temporary path
        (None, with a reason, when the file was missing, not a regular file, reached
        through a link, or changed while read).  Never follows a remote link."""

    def close(self) -> None:
        """Release the connection (idempotent)."""
