"""`gpuflow run --up --sandbox --count 2 --down` end to end: two sandbox nodes, TF_CONFIG on both,
and killing worker 1 mid-run fails the run naming node 1, with nothing left (gpuflow/testing/leaks.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gpuflow import jobs, procs
from gpuflow.testing import leaks
from infra.sandbox import in_process_sandbox
from tests.jobs.test_multinode_run import WORKER_SCRIPT

pytestmark = pytest.mark.slow


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def _nothing_left(home: Path) -> list[str]:
    import boto3

    left = leaks.cloud_leftovers(lambda service, region: boto3.client(service, region_name=region), ["us-east-1"])
    left += leaks.local_leftovers(home, server_alive=lambda _home: None)
    return [leftover.describe() for leftover in left]


def test_killing_worker_1_ends_the_run_failed_naming_node_1_with_nothing_left(tmp_path, monkeypatch, capfd,
                                                                             gpuflow_home):
    project = tmp_path / "project"
    project.mkdir()
    (project / "worker.py").write_text(WORKER_SCRIPT)
    monkeypatch.chdir(project)
    codes: list[int] = []
    with in_process_sandbox():
        runner = threading.Thread(target=lambda: codes.append(cli(
            ["run", "--up", "--sandbox", "--count", "2", "--down", "pair", "--", "python", "worker.py", "hang"])))
        runner.start()
        deadline = time.monotonic() + 120
        record = None
        while time.monotonic() < deadline and runner.is_alive():  # both workers said hello, and wait
            records = jobs.all_records()
            if records and records[0].workers:
                record = records[0]
                logs = [Path(worker.remote_dir, "job.log") for worker in record.workers]
                if all(log.is_file() and "waiting" in log.read_text() for log in logs):
                    break
            time.sleep(0.1)
        assert record is not None and len(record.workers) == 2, capfd.readouterr().err
        chief, worker = record.workers
        assert Path(chief.remote_dir).parent.parent != Path(worker.remote_dir).parent.parent  # two node directories
        assert chief.port != worker.port and {chief.host, worker.host} == {"127.0.0.1"}
        os.killpg(procs.proven(os.path.join(worker.remote_dir, procs.JOB_RECORD)), signal.SIGKILL)
        runner.join(timeout=120)
        captured = capfd.readouterr()
        assert not runner.is_alive()
        assert codes == [137], captured.err
        assert "node 1 failed: its job exited with code 137" in captured.err
        # the chief was ended by its peer watch (within a poll: not by gpuflow's 45 s settle), and its log says why
        assert "ending this worker (node 0)" in captured.out and "stopping the job still running" not in captured.err
        [final] = jobs.all_records()
        assert final.status is jobs.RunState.FAILED and final.failure == "node 1 failed: its job exited with code 137"
        assert _nothing_left(gpuflow_home) == []


def test_a_two_node_sandbox_run_through_the_loopback_openssh_server(tmp_path, monkeypatch, capfd, sshd, gpuflow_home):
    """GPUFLOW_SANDBOX_SSH: both nodes are reached over real SSH — the parallel syncs, the starts, the log."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "worker.py").write_text(WORKER_SCRIPT)
    monkeypatch.setenv(
        "GPUFLOW_SANDBOX_SSH",
        f"host=127.0.0.1,port={sshd.port},user={sshd.user},key={sshd.client_key},"
        f"host_key={sshd.directory / 'ssh_host_ed25519_key.pub'}",
    )
    monkeypatch.chdir(project)
    with in_process_sandbox():
        code = cli(["run", "--up", "--sandbox", "--count", "2", "--down", "sshpair", "--", "python", "worker.py"])
        captured = capfd.readouterr()
        assert code == 0, captured.err
        [record] = jobs.all_records()
        assert record.status is jobs.RunState.SUCCEEDED and len(record.workers) == 2
        assert "syncing" in captured.err and "node 1" in captured.err
        assert "worker 0 of 2 index 0" in captured.out and "got hello from 1" in captured.out
        assert _nothing_left(gpuflow_home) == []
        # the cluster is gone; what `run` kept of every node's log is still there
        assert cli(["logs", record.run_id, "--all"]) == 0
        lines = capfd.readouterr().out.splitlines()
        assert "[node 0] got hello from 1" in lines and "[node 1] got hello from 0" in lines
