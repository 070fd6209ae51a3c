"""The one remote lock (`take_lock`, put before the venv preparation and the sync exchange
scripts) excludes gpuflow's local lock (`gpuflow.state.locked`) on the same file, says once
that it waits, gives up after its limit or waits without one."""

from __future__ import annotations

import subprocess
import threading

import pytest

from gpuflow.jobs import scripts
from gpuflow.state import locked
from gpuflow.sync.exchange import EXCHANGE_SCRIPT
from gpuflow.transport.base import TAKE_LOCK_SHELL_FUNCTION


def _take(lock, seconds: str) -> subprocess.Popen:
    program = TAKE_LOCK_SHELL_FUNCTION + 'take_lock "$1" "$2" WAITING || exit 7\necho taken\n'
    return subprocess.Popen(["sh", "-c", program, "sh", str(lock), seconds], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("seconds", ["0.2", ""])
def test_take_lock_waits_for_the_holder(tmp_path, seconds):
    lock = tmp_path / "the.lock"
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with locked(lock):
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        holding.wait(60)
        process = _take(lock, seconds)
        assert process.stdout.readline() == "WAITING\n"  # said once, before waiting
        if seconds:
            assert process.wait(60) == 7 and process.stdout.read() == ""  # gave up: not taken
        else:
            release.set()  # no limit: it takes the lock once the holder lets go
            assert process.wait(60) == 0 and process.stdout.read() == "taken\n"
    finally:
        release.set()
        holder.join()


def test_take_lock_takes_a_free_lock_silently(tmp_path):
    process = _take(tmp_path / "free.lock", "0.2")
    assert process.wait(60) == 0 and process.stdout.read() == "taken\n"


def test_both_remote_scripts_use_the_one_lock():
    environment = scripts.prepare_environment_script(env_dir="/e", base_python="p", requirements="r")
    for script in (environment, EXCHANGE_SCRIPT):
        assert script.count(TAKE_LOCK_SHELL_FUNCTION) == 1
        rest = script.replace(TAKE_LOCK_SHELL_FUNCTION, "")
        assert 'take_lock "' in rest and "9>" not in rest and "flock -" not in rest and "flock 9" not in rest
