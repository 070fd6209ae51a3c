"""A sandbox server always ends: also once its directory (and so its record) is gone,
and when its idle watcher fails -- never a server that outlives everyone who could find it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from importlib import import_module

from infra import sandbox
from infra.sandbox import read_server_record
from tests.infra.test_sandbox import REPOSITORY_ROOT, _serve_processes
from tests.waiting import wait_for

sandbox_serve = import_module("infra.sandbox.serve")


def test_a_server_whose_directory_is_deleted_exits(tmp_path):
    """pytest's tmp cleanup (or a user) removes <home>/sandbox while the server runs: nobody
    can find it any more, so once idle it exits instead of living forever."""
    home = tmp_path / "home"
    home.mkdir()
    directory = sandbox.server_directory(home)
    program = "import os, sys; from pathlib import Path; from infra.sandbox import sandbox_endpoint; sandbox_endpoint(Path(sys.argv[1])); os._exit(0)"
    try:
        subprocess.run([sys.executable, "-c", program, str(home)], timeout=60, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT), sandbox.ENV_IDLE_SECONDS: "0.5"})
        record = read_server_record(home)
        assert _serve_processes(directory) == [record.pid]
        shutil.rmtree(home / "sandbox")
        wait_for(lambda: not _serve_processes(directory), timeout=60, what="the server without a directory to exit")
    finally:
        for pid in _serve_processes(directory):
            os.kill(pid, signal.SIGKILL)


class _Idle:
    last_request = time.monotonic() - 3600.0


def test_a_failing_idle_watcher_stops_the_server(tmp_path, monkeypatch, capsys):
    """Any exception in the watcher stops the server (one line in its log), not just the thread."""
    directory = tmp_path / "server"
    directory.mkdir()
    (directory / sandbox.SERVER_RECORD_NAME).write_text(f'{{"pid": {os.getpid()}, "port": 1, "started_at": 0}}')

    def broken() -> dict:
        raise RuntimeError("moto backend exploded")

    monkeypatch.setattr(sandbox_serve, "held_resources", broken)
    stopped: list[bool] = []
    sandbox_serve._exit_when_idle(Path(directory), _Idle(), 0.04, lambda: stopped.append(True))
    assert stopped == [True]
    lines = [line for line in capsys.readouterr().out.splitlines() if "moto backend exploded" in line]
    assert len(lines) == 1 and "stopping" in lines[0]
