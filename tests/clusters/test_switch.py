"""`gpuflow status` shows what the instance's dead-man's switch thinks: the
real switch (as user-data installs it) writes its status file, gpuflow reads it
over the real loopback OpenSSH server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuflow import clusters, nodes
from gpuflow.clusters import switch
from gpuflow.config import gpuflow_home
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.clusters.switch import SwitchStatus, Verdict, describe, parse_status, read_switches
from gpuflow.transport import hostkeys
from infra.userdata import installed_deadman_script
from tests.sshd import free_port
from tests.waiting import wait_for as _wait_for


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def _verdict(path: Path) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    return next((line[len("verdict="):] for line in text.splitlines() if line.startswith("verdict=")), None)


class RealSwitch:
    """The installed switch running here for a sandbox instance's directory.
    Its interval is long, so after its first check it writes nothing while the
    test reads (no race with gpuflow's own short connection)."""

    def __init__(self, tmp_path: Path, directory: Path, ssh_port: int) -> None:
        self.script = tmp_path / "gpuflow-deadman"
        self.script.write_text(installed_deadman_script())
        self.tmp_path, self.directory, self.ssh_port = tmp_path, directory, ssh_port
        self.status_file = directory / "deadman.status"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.status_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            ["bash", str(self.script), "--base-dir", str(self.directory), "--status-file", str(self.status_file),
             "--deadline-file", str(self.tmp_path / "deadline"), "--state-file", str(self.tmp_path / "idle-since"),
             "--log-file", str(self.tmp_path / "deadman.log"), "--ssh-port", str(self.ssh_port),
             "--interval", "60", "--uptime-from", "start", "--shutdown-command", "true"],
            env={**os.environ, "GPUFLOW_DEADMAN_IDLE_SECONDS": "600", "GPUFLOW_DEADMAN_MAX_SECONDS": "7200"},
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: _verdict(self.status_file) is not None, 15, "the switch's first check")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)


@pytest.mark.slow
def test_status_says_why_the_instance_is_idle_or_busy_and_when_it_stops(sshd, monkeypatch, capfd, tmp_path):
    from infra.sandbox import stop_sandbox

    sandbox_ssh = (f"host=127.0.0.1,port={sshd.port},user={sshd.user},key={sshd.client_key},"
                   f"host_key={sshd.directory / 'ssh_host_ed25519_key.pub'}")
    monkeypatch.setenv("GPUFLOW_SANDBOX_SSH", sandbox_ssh)
    monkeypatch.chdir(tmp_path)
    # The sandbox server of this home, not an in-process mock: `gpuflow ssh` in a subprocess
    # asks the same fake cloud whether the instance runs, as separate commands do.
    try:
        cluster = clusters.up(clusters.resolve_spec("sw", {"sandbox": True}, project_dir=tmp_path))
        directory = nodes.sandbox_directory(cluster)
        directory.mkdir(parents=True, exist_ok=True)
        switch = RealSwitch(tmp_path, directory, sshd.port)
        session = None
        try:
            switch.start()
            assert _verdict(switch.status_file) == "idle"
            capfd.readouterr()
            assert cli(["status", "sw"]) == 0
            out = capfd.readouterr().out
            instance = cluster.head.instance_id
            assert f"dead-man's switch on {instance}: idle since " in out, out
            assert "stops at " in out and "(in 9m)" in out  # 600 s window, just begun
            assert "max-hours cap at " in out and "(in 1h59m)" in out
            assert not (directory / "heartbeat").exists()  # looking did not touch the heartbeat

            # A person logs in with `gpuflow ssh` and stays; the switch (restarted) sees them.
            switch.stop()
            session = subprocess.Popen([sys.executable, "-m", "gpuflow", "ssh", "sw", "--", "sleep", "60"],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       env={**os.environ, "GPUFLOW_SANDBOX_SSH": sandbox_ssh})
            _wait_for(lambda: (directory / "heartbeat").exists(), 30, "gpuflow ssh's heartbeat")
            switch.start()
            assert _verdict(switch.status_file) == "busy"
            assert cli(["status", "sw", "--json"]) == 0
            [reported] = json.loads(capfd.readouterr().out)["switch"]
            assert reported["instance_id"] == instance and reported["verdict"] == "busy"
            reasons = reported["reasons"]
            assert any(reason.startswith("SSH session(s): 1 from 127.0.0.1:") for reason in reasons), reasons
            assert any(reason.startswith("heartbeat ") for reason in reasons), reasons
            assert reported["stops_at"] == reported["max_hours_deadline"] and reported["error"] is None
            assert reported["idle_minutes"] == 10.0 and reported["stale"] is False
        finally:
            if session is not None:
                session.kill()
                session.wait(timeout=10)
                session.stderr.close()
            switch.stop()
            clusters.down("sw")
    finally:
        stop_sandbox(gpuflow_home())


def _instance_cluster(server, *, port: int | None = None) -> Cluster:
    cluster = Cluster(
        name="web", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
        nodes=(Node("i-0000000000000001", "running", public_ip="127.0.0.1"), Node("i-0000000000000002", "stopped")),
        key_path=str(server.client_key), ssh_user=server.user, ssh_port=port or server.port,
    )
    StateStore(gpuflow_home(), "clusters").put(cluster.name, cluster.to_dict())
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", port or server.port,
                           [hostkeys.parse_public_key(server.host_public_key)])
    return cluster


def test_an_instance_status_file_is_read_over_ssh(sshd_session, monkeypatch, tmp_path):
    status_file = tmp_path / "run" / "deadman.status"
    status_file.parent.mkdir()
    now = int(time.time())
    status_file.write_text(f"verdict=idle\nupdated_at={now}\nidle_seconds=3600\ndeadline={now + 7200}\n"
                           f"idle_since={now - 600}\nstop_at={now + 3000}\n")
    monkeypatch.setattr(switch, "INSTANCE_STATUS_PATH", str(status_file))
    [status] = read_switches(_instance_cluster(sshd_session))  # the stopped node is not asked
    assert status.error is None and status.verdict is Verdict.IDLE and status.reasons == ()
    assert abs(status.idle_since - (now - 600)) <= 2 and abs(status.stops_at - (now + 3000)) <= 2
    assert abs(status.deadline - (now + 7200)) <= 2


def test_an_unreachable_node_is_reported_not_raised(sshd_session, fake_cloud):
    cluster = _instance_cluster(sshd_session, port=free_port())  # nothing listens there
    started = time.monotonic()
    [status] = read_switches(cluster)
    assert status.verdict is None and "cannot reach" in status.error
    assert time.monotonic() - started < 30  # one attempt, no back-off
    assert describe([status]) == [f"dead-man's switch on i-0000000000000001: unknown: {status.error}"]


def test_parse_converts_the_instance_clock_and_refuses_garbage():
    # The instance's clock is 100 s ahead of this machine's.
    text = "now=1000100\nverdict=busy\nupdated_at=1000090\ndeadline=1003700\nidle_since=\nstop_at=\nreason=job r1 (pid 7) running\n"
    status = parse_status(text, "i-1", local_now=1000000.0)
    assert status.verdict is Verdict.BUSY and status.reasons == ("job r1 (pid 7) running",)
    assert status.updated_at == 999990 and status.deadline == 1003600 and status.stops_at == 1003600
    assert status.idle_since is None and status.stop_at is None
    lines = describe([status], now=1000000.0)
    assert lines[0] == "dead-man's switch on i-1: busy: job r1 (pid 7) running"
    assert "(in 1h00m)" in lines[1]
    for garbage in ("", "now=5\n", "verdict=sleepy\n", "\x00\x01binary"):
        parsed = parse_status(garbage, "i-1")
        assert parsed.verdict is None and parsed.error


def test_a_stale_status_is_flagged():
    status = SwitchStatus("i-1", verdict=Verdict.IDLE, idle_since=time.time() - 900, stop_at=time.time() + 100,
                          updated_at=time.time() - 600)
    assert status.stale
    assert any("may not be running" in line for line in describe([status]))
