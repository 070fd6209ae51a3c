"""Pause a run's training job right after its first step checkpoint (SIGSTOP: a slow GPU, as
far as the run can tell), so that an interruption the test then arranges lands mid-epoch
whatever the machine's load: the course module on digits trains its ~200 steps in a second or
two, which a job let go at the wrong moment finishes before any notice is acted on."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpuflow import procs
from tests.waiting import wait_for

SLICE_SECONDS = 0.05


@dataclass(frozen=True)
class PausedJob:
    run_dir: Path
    pid: int  # the job: the leader of its process group
    identity: str

    def resume(self) -> None:
        """SIGCONT the job's group, only while it is still the same process (never a recycled pid)."""
        if procs.identity(self.pid) == self.identity:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)

    def gone(self) -> bool:
        return procs.identity(self.pid) != self.identity

    def pending(self, number: signal.Signals) -> bool:
        """Whether signal ``number`` waits for the (stopped) job: sent, not yet handled."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
        return any(mask >> (number - 1) & 1 for mask in masks)


def has_a_step_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "outputs" / "checkpoint" / "state.json").is_file()


def paused_at_first_checkpoint(find_run_dir: Callable[[], Path | None], timeout: float = 300) -> PausedJob:
    """The run's job, stopped once it has saved its first step checkpoint.  ``find_run_dir``: the
    run's directory on its node, or None while there is none.  From the moment the job's pid is
    known it runs only in slices of SLICE_SECONDS between two looks, so however late this test
    gets to look, the job is stopped at most a slice after that checkpoint."""

    def job() -> tuple[Path, int] | None:
        run_dir = find_run_dir()
        pid = procs.proven(str(run_dir / procs.JOB_RECORD)) if run_dir is not None else None
        return (run_dir, pid) if pid else None

    run_dir, pid = wait_for(job, timeout=timeout, what="the run's job")
    identity = procs.identity(pid)
    assert identity is not None
    os.killpg(pid, signal.SIGSTOP)
    paused = PausedJob(run_dir, pid, identity)
    deadline = time.monotonic() + timeout
    while not has_a_step_checkpoint(run_dir):
        if paused.gone() or time.monotonic() > deadline:
            paused.resume()
            raise AssertionError(f"no step checkpoint from the job in {run_dir}")
        os.killpg(pid, signal.SIGCONT)
        time.sleep(SLICE_SECONDS)
        os.killpg(pid, signal.SIGSTOP)
    return paused
