"""The dead-man's switch, run for real: infra/assets/deadman.sh on this machine.

A stand-in ``shutdown`` on PATH appends its arguments to a marker file instead
of powering anything off; intervals are shrunk to fractions of a second and
the idle window / hour cap to a few seconds through the script's own
seconds-based overrides.  Each test is bounded by a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.userdata import DEADMAN_ASSET

pytestmark = pytest.mark.timeout(60)


@dataclass
class Switch:
    process: subprocess.Popen
    marker: Path
    log: Path
    base: Path
    started: float

    def fired(self) -> bool:
        return self.marker.exists() and self.marker.read_text().strip() != ""

    def wait_fired(self, timeout: float) -> float:
        """Seconds from start until the stand-in shutdown ran; fails after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fired():
                return time.monotonic() - self.started
            assert self.process.poll() is None, f"the switch exited ({self.process.returncode}):\n{self.log_text()}"
            time.sleep(0.05)
        pytest.fail(f"the switch did not fire within {timeout} s; log:\n{self.log_text()}")

    def stays_quiet(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert not self.fired(), f"the switch fired unexpectedly; log:\n{self.log_text()}"
            assert self.process.poll() is None, f"the switch exited ({self.process.returncode}):\n{self.log_text()}"
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"


@pytest.fixture
def start_switch(tmp_path: Path) -> Iterator:
    """Start deadman.sh with a stand-in shutdown; stop it (its whole process group) afterwards."""
    stand_in_bin = tmp_path / "bin"
    stand_in_bin.mkdir()
    marker = tmp_path / "shutdown-called"
    shutdown = stand_in_bin / "shutdown"
    shutdown.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$DEADMAN_TEST_MARKER"\n')
    shutdown.chmod(0o755)
    started: list[Switch] = []

    def start(*, idle_seconds: int, max_seconds: int = 3600, base: Path | None = None, extra: list[str] = (), env=None):
        base = base if base is not None else tmp_path / "gpuflow"
        log = tmp_path / "deadman.log"
        environment = {
            **os.environ,
            "PATH": f"{stand_in_bin}{os.pathsep}{os.environ['PATH']}",
            "DEADMAN_TEST_MARKER": str(marker),
            "GPUFLOW_DEADMAN_IDLE_SECONDS": str(idle_seconds),
            "GPUFLOW_DEADMAN_MAX_SECONDS": str(max_seconds),
            "GPUFLOW_DEADMAN_RETRY_SECONDS": "1",
            **(env or {}),
        }
        process = subprocess.Popen(
            ["bash", str(DEADMAN_ASSET), "--base-dir", str(base), "--log-file", str(log),
             "--state-file", str(tmp_path / "idle-since"), "--interval", "0.1", "--uptime-from", "start", *extra],
            env=environment, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        switch = Switch(process, marker, log, base, time.monotonic())
        started.append(switch)
        return switch

    yield start
    for switch in started:
        if switch.process.poll() is None:
            os.killpg(switch.process.pid, signal.SIGKILL)
        switch.process.wait(timeout=10)
        if switch.process.stderr:
            switch.process.stderr.close()


@pytest.fixture
def running_job(tmp_path: Path) -> Iterator:
    """A real live process standing in for a detached training job."""
    processes: list[subprocess.Popen] = []

    def make(base: Path, run_id: str = "run-1") -> tuple[subprocess.Popen, Path]:
        job = subprocess.Popen(["sleep", "60"], start_new_session=True)
        processes.append(job)
        run_directory = base / "runs" / run_id
        run_directory.mkdir(parents=True, exist_ok=True)
        (run_directory / "job.pid").write_text(f"{job.pid}\n")
        return job, run_directory

    yield make
    for job in processes:
        if job.poll() is None:
            job.kill()
        job.wait(timeout=10)


def test_fires_after_the_idle_window_and_not_before(start_switch):
    switch = start_switch(idle_seconds=2)
    elapsed = switch.wait_fired(timeout=8)
    # Uptime has 1 s resolution: the window is 2 s, so never under ~1 s.
    assert elapsed >= 1.0
    assert switch.marker.read_text().splitlines()[0] == "-h now"
    log = switch.log_text()
    assert "idle:" in log and "FIRE: idle for" in log


def _kernel_uptime() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]))


def test_a_restarted_switch_resumes_the_idle_period_it_had_begun(start_switch, tmp_path):
    """systemd restarts the switch on any exit: that must not restart the idle timer."""
    (tmp_path / "idle-since").write_text(f"{_kernel_uptime() - 100}\n")
    switch = start_switch(idle_seconds=50)
    elapsed = switch.wait_fired(timeout=5)
    assert elapsed < 5
    assert "resuming an idle period that began" in switch.log_text()


def test_busy_clears_the_saved_idle_period(start_switch, running_job, tmp_path):
    running_job(tmp_path / "gpuflow")
    (tmp_path / "idle-since").write_text(f"{_kernel_uptime() - 100}\n")
    switch = start_switch(idle_seconds=50)
    switch.stays_quiet(1.5)
    assert not (tmp_path / "idle-since").exists()


def test_hostile_directory_names_are_handled_literally(start_switch, running_job, tmp_path):
    base = tmp_path / "gpu flow 'x' $(touch pwned) *"
    job, _ = running_job(base, run_id="run $(id) ; *")
    switch = start_switch(idle_seconds=1, base=base)
    switch.stays_quiet(2)
    assert "busy: job run $(id) ; *" in switch.log_text()
    job.kill()
    job.wait()
    switch.wait_fired(timeout=6)
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


def test_missing_base_directory_counts_as_idle(start_switch, tmp_path):
    switch = start_switch(idle_seconds=1, base=tmp_path / "does" / "not" / "exist")
    switch.wait_fired(timeout=6)


def test_does_not_fire_while_a_job_runs_then_fires_once_it_wrote_exit_code(start_switch, running_job, tmp_path):
    base = tmp_path / "gpuflow"
    _job, run_directory = running_job(base)
    switch = start_switch(idle_seconds=1)
    switch.stays_quiet(3.5)  # more than three idle windows
    assert "busy: job run-1" in switch.log_text()

    # The job ends (its supervisor writes exit_code); the process may linger a moment.
    (run_directory / "exit_code").write_text("0\n")
    switch.wait_fired(timeout=6)


def test_fires_once_the_job_process_is_gone(start_switch, running_job, tmp_path):
    base = tmp_path / "gpuflow"
    job, _ = running_job(base)
    switch = start_switch(idle_seconds=1)
    switch.stays_quiet(2)
    job.kill()
    job.wait()
    switch.wait_fired(timeout=6)


def test_hour_cap_fires_even_while_a_job_runs(start_switch, running_job, tmp_path):
    running_job(tmp_path / "gpuflow")
    switch = start_switch(idle_seconds=1, max_seconds=3)
    elapsed = switch.wait_fired(timeout=8)
    assert elapsed >= 2.0
    assert "reached the cap" in switch.log_text()


def test_hour_cap_defaults_to_the_kernel_uptime(start_switch, running_job, tmp_path):
    """Without --uptime-from start the cap counts from boot, so a restarted
    switch does not restart the cap: this machine has been up longer than 2 s."""
    running_job(tmp_path / "gpuflow")
    switch = start_switch(idle_seconds=60, max_seconds=2, extra=["--uptime-from", "boot"])
    switch.wait_fired(timeout=5)


def test_heartbeats_keep_it_up_until_they_stop(start_switch, tmp_path):
    base = tmp_path / "gpuflow"
    base.mkdir()
    heartbeat = base / "heartbeat"
    heartbeat.touch()
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            heartbeat.touch()
            stop.wait(0.3)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        switch = start_switch(idle_seconds=2)
        switch.stays_quiet(4)
        assert "busy: heartbeat" in switch.log_text()
    finally:
        stop.set()
        beater.join()
    switch.wait_fired(timeout=8)


def test_stale_and_garbage_pid_files_do_not_keep_it_up(start_switch, tmp_path):
    base = tmp_path / "gpuflow"
    finished = subprocess.Popen(["true"])
    finished.wait()
    for run_id, content in (("stale", f"{finished.pid}\n"), ("empty", ""), ("garbage", "$(reboot); 12ab\n"), ("init", "1\n")):
        (base / "runs" / run_id).mkdir(parents=True)
        (base / "runs" / run_id / "job.pid").write_text(content)
    switch = start_switch(idle_seconds=1)
    switch.wait_fired(timeout=6)


def _boot_epoch() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise AssertionError("no btime in /proc/stat")


@pytest.mark.parametrize("written", ["before this boot", "long before the process started"])
def test_a_pid_file_older_than_its_process_does_not_count(written, start_switch, running_job, tmp_path):
    """A live process whose pid file was written before this boot (a reboot
    reused the pid), or minutes before the process started (the job ended and
    its pid was reused), is not the job: not busy."""
    base = tmp_path / "gpuflow"
    _job, run_directory = running_job(base)
    mtime = _boot_epoch() - 10 if written == "before this boot" else time.time() - 400
    os.utime(run_directory / "job.pid", (mtime, mtime))
    switch = start_switch(idle_seconds=1)
    switch.wait_fired(timeout=6)


def test_a_heartbeat_from_the_far_future_cannot_pin_the_instance_up(start_switch, tmp_path):
    base = tmp_path / "gpuflow"
    base.mkdir()
    next_year = time.time() + 365 * 24 * 3600
    (base / "heartbeat").touch()
    os.utime(base / "heartbeat", (next_year, next_year))
    switch = start_switch(idle_seconds=1)
    switch.wait_fired(timeout=6)


def test_a_failing_shutdown_command_is_retried(start_switch, tmp_path):
    failing = tmp_path / "failing-shutdown"
    failing.write_text('#!/bin/sh\nprintf "try\\n" >> "$DEADMAN_TEST_MARKER.tries"\nexit 3\n')
    failing.chmod(0o755)
    switch = start_switch(idle_seconds=1, extra=["--shutdown-command", f"{failing} -h now"])
    tries = Path(f"{switch.marker}.tries")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and (not tries.exists() or len(tries.read_text().splitlines()) < 3):
        time.sleep(0.05)
    assert tries.exists() and len(tries.read_text().splitlines()) >= 3, switch.log_text()
    assert switch.process.poll() is None  # still alive, still trying
    assert "shutdown command failed (exit 3)" in switch.log_text()


def test_an_unwritable_log_does_not_stop_it(start_switch, tmp_path):
    switch = start_switch(idle_seconds=1, extra=["--log-file", str(tmp_path / "no-such-dir" / "deadman.log")])
    switch.wait_fired(timeout=6)


@pytest.mark.parametrize(
    "arguments",
    [["--idle-minutes", "soon"], ["--max-hours", "-1"], ["--interval", "1; reboot"], ["--interval", "0"],
     ["--uptime-from", "yesterday"], ["--bogus"]],
)
def test_bad_settings_are_refused_at_start(arguments, tmp_path):
    result = subprocess.run(
        ["bash", str(DEADMAN_ASSET), "--log-file", str(tmp_path / "log"), *arguments],
        capture_output=True, text=True, timeout=10,
    )
    assert result.returncode == 2
    assert "gpuflow-deadman:" in result.stderr
