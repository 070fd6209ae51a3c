"""A sandbox notice is served once the spot watcher of every running job on the node has
settled (gpuflow.clusters.interrupt.wait_for_watchers): given as a job starts, a notice of a
second or two otherwise raced the watcher's start, and the run ended as a lost instance
instead of an interrupted one (a CI run of tests/testing/test_recover_in_sandbox.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpuflow import procs
from gpuflow.clusters.interrupt import wait_for_watchers
from gpuflow.jobs import imds_watch


@pytest.fixture
def job():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _run_of(node: Path, name: str, pid: int) -> Path:
    run = node / "runs" / name
    run.mkdir(parents=True)
    (run / procs.JOB_RECORD).write_text(f"{pid} {procs.identity(pid)}\n")
    assert procs.proven(str(run / procs.JOB_RECORD)) == pid
    return run


def test_the_notice_waits_for_a_running_jobs_watcher_to_settle(tmp_path, job):
    run = _run_of(tmp_path, "r1", job.pid)
    settled_at: list[float] = []

    def watcher_settles() -> None:
        time.sleep(0.5)
        settled_at.append(time.monotonic())
        (run / procs.WATCHER_STATE).write_text('{"state": "watching"}')

    threading.Thread(target=watcher_settles, daemon=True).start()
    wait_for_watchers(tmp_path, timeout=30)
    assert settled_at and (run / procs.WATCHER_STATE).exists()  # it waited for it


def test_ended_jobs_and_settled_watchers_are_not_waited_for(tmp_path, job):
    settled = _run_of(tmp_path, "settled", job.pid)
    (settled / procs.WATCHER_STATE).write_text('{"state": "off"}')
    ended = tmp_path / "runs" / "ended"
    ended.mkdir()
    (ended / procs.JOB_RECORD).write_text(f"{os.getpid()} not-this-process\n")  # no longer the recorded process
    started = time.monotonic()
    wait_for_watchers(tmp_path, timeout=30)
    wait_for_watchers(tmp_path / "no-runs-here", timeout=30)
    assert time.monotonic() - started < 10  # a bound, not a timing: the 30 s were never waited


def test_a_watcher_that_never_settles_delays_the_notice_only_up_to_the_bound(tmp_path, job):
    _run_of(tmp_path, "r1", job.pid)
    started = time.monotonic()
    wait_for_watchers(tmp_path, timeout=0.3)
    assert time.monotonic() - started >= 0.3


def test_the_watchers_state_file_is_named_alike_on_both_sides():
    assert procs.WATCHER_STATE == imds_watch.WATCHER_FILE
