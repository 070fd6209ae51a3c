"""Domain errors: everything a user can cause ends in one of these.

Library code raises them (``raise ClusterNotFound(...) from exc``); exactly one
place, :func:`gpuflow.cli.main`, turns them into a one-line message and an exit
code.  No library code calls ``sys.exit``.

Each class carries its exit code so scripts can tell failures apart:

====  ==========================================================
code  meaning
====  ==========================================================
1     generic gpuflow failure
2     bad usage / bad configuration / bad input data
3     credentials missing or refused
4     something named does not exist (cluster, run, file)
5     the cloud refused or failed (API error, no capacity)
6     a host could not be reached (SSH down, instance gone)
7     security refusal (host key mismatch, unsafe path)
8     local state problem (corrupt or locked state file)
9     a run was lost: its job ended without an exit code
75    a job was interrupted and saved a checkpoint: resumable
====  ==========================================================

A failed remote job exits gpuflow with the job's own exit code
(:class:`JobFailed`); SIGTERM ends gpuflow with 143 (:class:`TerminatedError`).
"""

from __future__ import annotations

# The base and the errors the cloud layer raises live in infra (which imports nothing
# from gpuflow): the same classes, so one ``except`` and one CLI mapping cover both.
from infra.errors import CapacityError, CloudError, CredentialsError, GpuflowError, UsageError  # noqa: F401 - re-exported


class ConfigError(GpuflowError):
    """A broken gpuflow.toml / [tool.gpuflow] section."""

    exit_code = 2


class DataError(GpuflowError):
    """Input data that is missing or unreadable."""

    exit_code = 2


class NotFound(GpuflowError):
    """Something the user named does not exist."""

    exit_code = 4


class ClusterNotFound(NotFound):
    pass


class RunNotFound(NotFound):
    pass


class UnreachableHost(GpuflowError):
    """SSH to an instance failed (after retries)."""

    exit_code = 6


class InstanceGone(UnreachableHost):
    """The instance behind a cluster is stopped or terminated."""

    @classmethod
    def no_longer_running(cls, instance: str, why: str, *, hint: str | None = None) -> InstanceGone:
        """The one wording, whoever finds out (the SSH transport after a failed
        connection, the sandbox before reaching its directory): ``instance`` names
        it (``at HOST``, ``i-… of cluster 'x'``), ``why`` says how it is known."""
        return cls(
            f"the instance {instance} is no longer running ({why})",
            hint=hint or "`gpuflow status` shows what happened to it; `gpuflow up` starts a new one",
        )


class ConnectionLost(UnreachableHost):
    """The SSH connection dropped while a command was running: whether the
    command finished is unknown.  The next call reconnects; a caller whose
    command is safe to repeat may simply call again."""


class SecurityError(GpuflowError):
    """gpuflow refused to do something unsafe."""

    exit_code = 7


class HostKeyMismatch(SecurityError):
    """The host presented a key that differs from the pinned one."""


class UnsafePath(SecurityError):
    """A remote path tried to escape the directory it must stay in."""


class StateError(GpuflowError):
    """The local state cache is corrupt or locked, or another gpuflow holds a lock (a sync destination's)."""

    exit_code = 8


class DamagedRecord(StateError):
    """A local state record that is not JSON, or not of its collection's shape.

    It concerns one record only: commands on other names skip it with a
    warning; ``raw`` is the parsed JSON when there was any (for what can still
    be read from it, e.g. a cluster's region), else None."""

    def __init__(self, message: str, *, path: object, name: str, raw: object = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.name = name
        self.raw = raw


class RemoteCommandFailed(GpuflowError):
    """A command gpuflow itself ran on the target (not the user's job) failed."""

    exit_code = 1


class JobFailed(GpuflowError):
    """A remote job ended with a non-zero exit code; gpuflow exits with it.
    It names its run, as :class:`JobInterrupted` does, so that a caller can
    load the run's record whichever way the job ended."""

    def __init__(self, message: str, *, job_exit_code: int, run_id: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.run_id = run_id
        # Exit codes are 0..255; a job killed by a signal reports 128+N.
        self.exit_code = job_exit_code if 0 < job_exit_code < 256 else 1


class RunLost(GpuflowError):
    """A run's job is gone without an exit code (its process vanished, its run
    directory was deleted, its instance was terminated): its outcome is unknown."""

    exit_code = 9


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that a
    terminated gpuflow takes the same clean-up paths as an interrupted one."""


class TerminatedError(GpuflowError):
    """gpuflow ended because it received SIGTERM: exit 143 (128 + 15), as the
    signal itself would have, but after cleaning up."""

    exit_code = 143


class JobInterrupted(GpuflowError):
    """A job saved a checkpoint and exited 75 ("interrupted, resumable": a spot
    interruption notice, `gpuflow stop`): not a failure of gpuflow nor of the job.
    gpuflow says so as information, not as an error, and exits 75 so that a
    script can tell it from success and from failure (and resume)."""

    exit_code = 75

    def __init__(self, message: str, *, run_id: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.run_id = run_id


class DetachedByInterrupt(GpuflowError):
    """Ctrl-C while following a run, answered with "detach": the job keeps
    running on the instance; gpuflow exits 130 like any interrupted command."""

    exit_code = 130
