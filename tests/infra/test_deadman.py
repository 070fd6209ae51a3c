"""The dead-man's switch, run for real: infra/assets/deadman.sh on this machine.

A stand-in ``shutdown`` on PATH appends its arguments to a marker file instead
of powering anything off; intervals are shrunk to fractions of a second and
the idle window / hour cap to a few seconds through the script's own
seconds-based overrides.  Each test is bounded by a few seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.userdata import installed_deadman_script
from tests.sshd import free_port
from tests.waiting import wait_for as _wait_for

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


@pytest.fixture(scope="module")
def switch_script(tmp_path_factory) -> Path:
    """The switch exactly as the user-data installs it (comments stripped)."""
    path = tmp_path_factory.mktemp("switch") / "gpuflow-deadman"
    path.write_text(installed_deadman_script())
    return path


@pytest.fixture
def start_switch(tmp_path: Path, switch_script: Path) -> Iterator:
    """Start deadman.sh with a stand-in shutdown; stop it (its whole process group) afterwards."""
    stand_in_bin = tmp_path / "bin"
    stand_in_bin.mkdir(exist_ok=True)
    marker = tmp_path / "shutdown-called"
    shutdown = stand_in_bin / "shutdown"
    shutdown.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$DEADMAN_TEST_MARKER"\n')
    shutdown.chmod(0o755)
    started: list[Switch] = []

    def start(*, idle_seconds: int, max_seconds: int = 3600, base: Path | None = None, extra: list[str] = (), env=None,
              ssh_port: int | None = None):
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
        # Every file the switch writes stays in tmp_path; no sshd listens on a fresh free port.
        process = subprocess.Popen(
            ["bash", str(switch_script), "--base-dir", str(base), "--log-file", str(log),
             "--state-file", str(tmp_path / "idle-since"), "--status-file", str(tmp_path / "status" / "deadman.status"),
             "--deadline-file", str(tmp_path / "lib" / "deadline"), "--ssh-port", str(ssh_port or free_port()),
             "--interval", "0.1", "--uptime-from", "start", *extra],
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
     ["--uptime-from", "yesterday"], ["--bogus"], ["--ssh-port", "22; reboot"], ["--gpu-threshold", "high"]],
)
def test_bad_settings_are_refused_at_start(arguments, tmp_path, switch_script):
    result = subprocess.run(
        ["bash", str(switch_script), "--log-file", str(tmp_path / "log"), *arguments],
        capture_output=True, text=True, timeout=10,
    )
    assert result.returncode == 2
    assert "gpuflow-deadman:" in result.stderr


# ----------------------------------------------------------------- people, not just jobs


def _status(tmp_path: Path) -> dict[str, list[str]]:
    """The switch's status file as key -> values."""
    values: dict[str, list[str]] = {}
    for line in (tmp_path / "status" / "deadman.status").read_text().splitlines():
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


def test_an_open_ssh_session_keeps_it_up_until_it_ends(start_switch, sshd, tmp_path):
    """A person in a plain `ssh` session (no gpuflow, no heartbeat) is busy:
    the real sshd on loopback, the real `ss`."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    session = subprocess.Popen(
        ["ssh", "-F", "none", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         f"{sshd.user}@127.0.0.1", "echo logged-in; sleep 60"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert session.stdout.readline() == b"logged-in\n", session.stderr.read()
    # A connection that never logs in (a scanner) stays open throughout: it is not a session.
    scanner = socket.create_connection(("127.0.0.1", sshd.port), timeout=10)
    try:
        try:
            switch = start_switch(idle_seconds=1, ssh_port=sshd.port)
            _wait_for(lambda: "busy: SSH session(s): 1 from 127.0.0.1:" in switch.log_text(), 10, "the SSH session")
            switch.stays_quiet(2.5)  # more than two idle windows
            status = _status(tmp_path)
            assert status["verdict"] == ["busy"] and status["stop_at"] == [""]
            assert status["reason"][0].startswith("SSH session(s): 1 from 127.0.0.1:")  # one: not the scanner
        finally:
            session.kill()
            session.wait(timeout=10)
            session.stdout.close()
            session.stderr.close()
        switch.wait_fired(timeout=8)
        assert "FIRE: idle for" in switch.log_text()
    finally:
        scanner.close()


def _fake_nvidia_smi(tmp_path: Path, body: str) -> None:
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)


def test_gpu_utilisation_above_the_threshold_keeps_it_up(start_switch, tmp_path):
    """A training process started by hand (no run, no connection) keeps the GPU busy."""
    readings = tmp_path / "utilisation"
    readings.write_text("0\n73\n")  # two GPUs, the second busy
    _fake_nvidia_smi(tmp_path, f'[ "$*" = "--query-gpu=utilization.gpu --format=csv,noheader,nounits" ] || exit 9\n'
                               f'cat {readings}\n')
    switch = start_switch(idle_seconds=1, extra=["--gpu-threshold", "5"])
    switch.stays_quiet(2.5)
    assert "busy: GPU 73% busy (threshold 5%)" in switch.log_text()
    assert _status(tmp_path)["reason"] == ["GPU 73% busy (threshold 5%)"]
    readings.write_text("4\n[N/A]\n")  # below the threshold: idle
    switch.wait_fired(timeout=8)


def test_a_hanging_probe_does_not_stop_the_switch(start_switch, tmp_path):
    _fake_nvidia_smi(tmp_path, "sleep 60\n")
    hanging_ss = tmp_path / "bin" / "ss"
    hanging_ss.write_text("#!/bin/sh\nsleep 60\n")
    hanging_ss.chmod(0o755)
    switch = start_switch(idle_seconds=1, env={"GPUFLOW_DEADMAN_PROBE_TIMEOUT": "1"})
    switch.wait_fired(timeout=15)


def test_the_status_file_says_idle_since_and_when_it_stops(start_switch, tmp_path):
    switch = start_switch(idle_seconds=50, max_seconds=3600)
    _wait_for(lambda: (tmp_path / "status" / "deadman.status").exists(), 10, "the status file")
    status = _status(tmp_path)
    now = time.time()
    assert status["verdict"] == ["idle"] and "reason" not in status
    idle_since, stop_at, deadline = int(status["idle_since"][0]), int(status["stop_at"][0]), int(status["deadline"][0])
    assert abs(idle_since - now) < 5 and stop_at == idle_since + 50
    assert abs(deadline - (now + 3600)) < 5
    assert int(status["idle_seconds"][0]) == 50
    assert switch.process.poll() is None


# ----------------------------------------------------------------- the max-hours deadline survives reboots


@pytest.fixture
def fake_clock(tmp_path: Path) -> Path:
    """A stand-in `date` whose `date +%s` reads a file (other uses go to the real one)."""
    import shutil

    clock = tmp_path / "clock"
    real_date = shutil.which("date")
    (tmp_path / "bin").mkdir(exist_ok=True)
    fake = tmp_path / "bin" / "date"
    fake.write_text(f'#!/bin/sh\nif [ "$*" = "+%s" ]; then cat "{clock}"; exit 0; fi\nexec {real_date} "$@"\n')
    fake.chmod(0o755)
    return clock


def test_a_reboot_does_not_move_the_deadline(start_switch, running_job, fake_clock, tmp_path):
    """Run the switch, 'reboot' (a new process whose uptime starts at 0) 10 minutes
    later: the deadline is the one written at first boot, and it fires there
    while a job runs, long before a fresh max-hours of uptime."""
    running_job(tmp_path / "gpuflow")
    deadline_file = tmp_path / "lib" / "deadline"
    first_boot = 1_900_000_000
    fake_clock.write_text(f"{first_boot}\n")
    first = start_switch(idle_seconds=60, max_seconds=1000)
    _wait_for(lambda: deadline_file.exists(), 10, "the deadline file")
    assert deadline_file.read_text() == f"{first_boot + 1000}\n"
    first.stays_quiet(0.5)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=10)

    fake_clock.write_text(f"{first_boot + 600}\n")  # the second boot
    second = start_switch(idle_seconds=60, max_seconds=1000)
    _wait_for(lambda: f"deadline={first_boot + 1000} " in second.log_text(), 10, "the second start")
    second.stays_quiet(1)
    assert deadline_file.read_text() == f"{first_boot + 1000}\n"  # not first_boot + 600 + 1000
    fake_clock.write_text(f"{first_boot + 1000}\n")
    second.wait_fired(timeout=8)
    assert "reached the cap" in second.log_text()


def _arm_backstop(tmp_path: Path, switch_script: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(switch_script), "--arm-backstop", "--log-file", str(tmp_path / "deadman.log"),
         "--deadline-file", str(tmp_path / "lib" / "deadline"), "--uptime-from", "start"],
        env={**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
             "DEADMAN_TEST_MARKER": str(tmp_path / "shutdown-called"), "GPUFLOW_DEADMAN_MAX_SECONDS": "7200"},
        capture_output=True, text=True, timeout=30,
    )


def _stand_in_shutdown(tmp_path: Path) -> Path:
    shutdown = tmp_path / "bin" / "shutdown"
    shutdown.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$DEADMAN_TEST_MARKER"\n')
    shutdown.chmod(0o755)
    return tmp_path / "shutdown-called"


def test_the_backstop_is_rearmed_at_boot_from_the_persisted_deadline(fake_clock, tmp_path, switch_script):
    marker = _stand_in_shutdown(tmp_path)
    first_boot = 1_900_000_000
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "deadline").write_text(f"{first_boot + 7200}\n")
    fake_clock.write_text(f"{first_boot + 3600}\n")  # an hour left: 60 min + a 5 min margin
    assert _arm_backstop(tmp_path, switch_script).returncode == 0
    assert marker.read_text() == "-h +65 gpuflow: max-hours cap reached\n"
    fake_clock.write_text(f"{first_boot + 7300}\n")  # booted after the deadline: now
    assert _arm_backstop(tmp_path, switch_script).returncode == 0
    assert marker.read_text().splitlines()[-1] == "-h +0 gpuflow: max-hours cap reached"
    assert (tmp_path / "lib" / "deadline").read_text() == f"{first_boot + 7200}\n"


def test_the_first_backstop_writes_the_deadline(fake_clock, tmp_path, switch_script):
    _stand_in_shutdown(tmp_path)
    fake_clock.write_text("1900000000\n")
    assert _arm_backstop(tmp_path, switch_script).returncode == 0
    deadline = int((tmp_path / "lib" / "deadline").read_text())
    assert 1900000000 + 7200 - 5 <= deadline <= 1900000000 + 7200  # boot (this process's start) + the cap
    assert (tmp_path / "shutdown-called").read_text() == "-h +125 gpuflow: max-hours cap reached\n"
