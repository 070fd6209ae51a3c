"""SSHRunner against a real loopback OpenSSH server: host key pinning, trust on
first use, dropped connections, a dead instance, an unreachable host."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gpuflow.errors import (
    ConnectionLost,
    CredentialsError,
    HostKeyMismatch,
    InstanceGone,
    SecurityError,
    UnreachableHost,
)
from gpuflow.procs import identity
from gpuflow.transport import hostkeys
from gpuflow.transport.ssh import Backoff, SSHRunner
from tests.transport.conftest import target_for

FAST = Backoff(retries=3, initial=0.01, factor=2.0, maximum=0.05)


def _runner(server, known_hosts, tmp_path, **options) -> SSHRunner:
    options.setdefault("base_dir", str(tmp_path / "base"))
    trust = options.pop("trust_on_first_use", False)
    return SSHRunner(target_for(server, known_hosts, trust_on_first_use=trust), **options)


def test_a_changed_host_key_refuses_and_nothing_runs(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    old_fingerprint = hostkeys.parse_public_key(sshd.host_public_key).fingerprint
    sshd.stop()
    sshd.regenerate_host_key()
    sshd.start(sshd.port)
    new_fingerprint = hostkeys.parse_public_key(sshd.host_public_key).fingerprint
    marker = tmp_path / "ran"
    runner = _runner(sshd, known_hosts, tmp_path, backoff=FAST)
    with pytest.raises(HostKeyMismatch) as raised:
        runner.run(["touch", str(marker)])
    message = raised.value.one_line()
    assert old_fingerprint in message and new_fingerprint in message and "\n" not in message
    assert not marker.exists() and not (tmp_path / "base").exists()
    assert runner.connections_made == 0
    # Even trust-on-first-use never overrides a pinned key.
    with pytest.raises(HostKeyMismatch):
        _runner(sshd, known_hosts, tmp_path, trust_on_first_use=True).run(["touch", str(marker)])
    assert not marker.exists()
    assert hostkeys.pinned_keys(known_hosts, "127.0.0.1", sshd.port)[0].fingerprint == old_fingerprint


def test_unknown_host_is_refused_unless_trusted_on_first_use_explicitly(sshd_session, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    marker = tmp_path / "ran"
    with pytest.raises(SecurityError, match="no pinned host key"):
        _runner(sshd_session, known_hosts, tmp_path).run(["touch", str(marker)])
    assert not marker.exists() and not known_hosts.exists()

    warnings: list[str] = []
    trusting = _runner(sshd_session, known_hosts, tmp_path, trust_on_first_use=True, warn=warnings.append)
    trusting.run(["touch", str(marker)])
    trusting.close()
    presented = hostkeys.parse_public_key(sshd_session.host_public_key)
    assert marker.exists()
    assert len(warnings) == 1 and presented.fingerprint in warnings[0] and "without verification" in warnings[0]
    assert hostkeys.pinned_keys(known_hosts, "127.0.0.1", sshd_session.port) == [presented]
    # Pinned now: a runner without the flag connects, silently.
    _runner(sshd_session, known_hosts, tmp_path, warn=warnings.append).run(["true"])
    assert len(warnings) == 1


def test_console_fingerprints_admit_exactly_that_key_and_pin_it(sshd_session, tmp_path):
    presented = hostkeys.parse_public_key(sshd_session.host_public_key)
    known_hosts = tmp_path / "known_hosts"
    impostor = "SHA256:" + "A" * 43
    with pytest.raises(HostKeyMismatch, match="not among the fingerprints"):
        _runner(sshd_session, known_hosts, tmp_path, expected_fingerprints=[impostor]).run(["true"])
    assert not known_hosts.exists()
    runner = _runner(sshd_session, known_hosts, tmp_path, expected_fingerprints=[impostor, presented.fingerprint])
    assert runner.run(["echo", "ok"]).stdout == b"ok\n"
    assert hostkeys.pinned_keys(known_hosts, "127.0.0.1", sshd_session.port) == [presented]


def test_a_refused_client_key_is_a_credentials_error(sshd_session, tmp_path, pinned_known_hosts):
    import subprocess

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    target = target_for(sshd_session, pinned_known_hosts)
    runner = SSHRunner(target.__class__(**{**target.__dict__, "key_path": str(stranger)}), backoff=FAST)
    with pytest.raises(CredentialsError, match="refused the SSH key"):
        runner.run(["true"])
    missing = SSHRunner(target.__class__(**{**target.__dict__, "key_path": str(tmp_path / "nope")}))
    with pytest.raises(CredentialsError, match="not found"):
        missing.run(["true"])
    garbage = tmp_path / "garbage"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n")
    slept: list[float] = []
    broken = SSHRunner(target.__class__(**{**target.__dict__, "key_path": str(garbage)}), sleep=slept.append)
    with pytest.raises(CredentialsError, match="cannot use the SSH key file"):
        broken.run(["true"])
    assert slept == []  # a broken key is not retried


def test_dropped_sessions_reconnect_and_continue(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    runner = _runner(sshd, known_hosts, tmp_path, backoff=FAST)
    log = tmp_path / "base" / "job.log"
    runner.put_bytes(b"line 1\n", str(log))
    assert runner.read_from(str(log)) == b"line 1\n"
    for step in range(2, 5):
        sshd.drop_sessions()  # the network drops between two calls
        with log.open("ab") as handle:
            handle.write(f"line {step}\n".encode())
        offset = len(b"".join(f"line {n}\n".encode() for n in range(1, step)))
        assert runner.read_from(str(log), offset) == f"line {step}\n".encode()
    sshd.drop_sessions()
    assert runner.run(["cat", str(log)]).stdout.count(b"\n") == 4
    sshd.drop_sessions()
    runner.get_file(str(log), str(tmp_path / "pulled"))
    assert (tmp_path / "pulled").read_bytes() == log.read_bytes()
    assert runner.connections_made == 6  # the first, then one after each of the five drops
    assert (tmp_path / "base" / "heartbeat").exists()  # touched on each connection
    runner.close()


def test_a_drop_during_a_command_says_its_outcome_is_unknown_then_recovers(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    runner = _runner(sshd, known_hosts, tmp_path, backoff=FAST)
    runner.connect()
    dropper = threading.Timer(0.5, sshd.drop_sessions)
    dropper.start()
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match="whether it finished is unknown"):
        runner.run(["sleep", "30"])
    dropper.join()
    assert time.monotonic() - started < 10
    assert runner.run(["echo", "again"]).stdout == b"again\n"


def test_server_gone_and_instance_dead_is_instance_gone_at_once(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    asked: list[bool] = []
    slept: list[float] = []

    def instance_alive() -> bool:
        asked.append(True)
        return False

    runner = _runner(sshd, known_hosts, tmp_path, backoff=Backoff(retries=5, initial=1.0), sleep=slept.append,
                     instance_alive=instance_alive)
    runner.connect()
    sshd.stop()
    started = time.monotonic()
    with pytest.raises(InstanceGone, match="no longer running"):
        runner.run(["true"])
    assert time.monotonic() - started < 3
    assert asked == [True] and slept == []


def test_alive_but_unreachable_gives_up_after_bounded_backoff(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    sshd.stop()
    slept: list[float] = []
    asked: list[bool] = []
    runner = _runner(
        sshd, known_hosts, tmp_path, backoff=Backoff(retries=4, initial=0.5, factor=2.0, maximum=2.0),
        sleep=slept.append, instance_alive=lambda: asked.append(True) or True, connect_timeout=2,
    )
    with pytest.raises(UnreachableHost) as raised:
        runner.run(["true"])
    assert not isinstance(raised.value, InstanceGone)
    assert slept == [0.5, 1.0, 2.0, 2.0] and len(asked) == 5
    line = raised.value.one_line()
    assert f"127.0.0.1:{sshd.port}" in line and "after 5 attempts" in line and "security group" in line


def test_reconnects_when_the_server_comes_back_during_backoff(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line() + "\n")
    runner = _runner(sshd, known_hosts, tmp_path, backoff=Backoff(retries=4, initial=0.1))
    runner.connect()
    sshd.stop()
    slept: list[float] = []

    def sleep_then_restart(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:
            sshd.start(sshd.port)  # the instance's sshd is back (e.g. after a network blip)

    runner._sleep = sleep_then_restart
    assert runner.run(["echo", "back"]).stdout == b"back\n"
    assert slept == [0.1, 0.2] and runner.connections_made == 2


def test_keepalives_are_on(sshd_session, tmp_path, pinned_known_hosts):
    runner = _runner(sshd_session, pinned_known_hosts, tmp_path, keepalive_interval=7)
    runner.connect()
    sent: list[bool] = []
    transport = runner._client.get_transport()
    original = transport.global_request
    transport.global_request = lambda kind, *a, **k: sent.append(kind) or original(kind, *a, **k)
    # paramiko's packetizer fires the keepalive after the interval of silence; force the clock.
    packetizer = transport.packetizer
    packetizer._Packetizer__keepalive_last = time.time() - 8
    packetizer._check_keepalive()
    assert sent == ["keepalive@lag.net"]
    runner.close()


def test_check_host_key_pins_without_running_anything(sshd_session, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    presented = hostkeys.parse_public_key(sshd_session.host_public_key)
    runner = _runner(sshd_session, known_hosts, tmp_path, expected_fingerprints=[presented.fingerprint])
    runner.check_host_key()
    assert hostkeys.pinned_keys(known_hosts, "127.0.0.1", sshd_session.port) == [presented]
    assert not (tmp_path / "base").exists() and runner.connections_made == 0


def test_a_session_killed_while_preparing_the_base_dir_is_retried(sshd_session, tmp_path, pinned_known_hosts, monkeypatch):
    """A drop right after connecting kills the idempotent set-up command (OpenSSH's
    'no exit status' → 255): the runner reconnects instead of failing the call."""
    from gpuflow.records import CommandResult

    runner = _runner(sshd_session, pinned_known_hosts, tmp_path)
    real_exec = SSHRunner._exec
    calls = {"n": 0}

    def first_setup_dies(self, command, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            return CommandResult(255, b"", b"")
        return real_exec(self, command, **kwargs)

    monkeypatch.setattr(SSHRunner, "_exec", first_setup_dies)
    try:
        assert runner.run(["echo", "still here"]).stdout == b"still here\n"
        assert runner.connections_made == 2
    finally:
        runner.close()


def test_output_is_complete_even_when_the_exit_status_comes_first(sshd_session, tmp_path, pinned_known_hosts):
    """OpenSSH may send a command's exit status before the tail of its output;
    the runner reads to EOF (this lost the last ~10 KB in 1 of 3 runs before)."""
    runner = _runner(sshd_session, pinned_known_hosts, tmp_path)
    payload = bytes(range(256)) * 2_500
    try:
        for _ in range(15):
            assert runner.run(["cat"], stdin=payload).stdout == payload
    finally:
        runner.close()


def test_a_background_process_holding_stdout_does_not_hang_the_command(sshd_session, tmp_path, pinned_known_hosts):
    """`sleep 30 &` holds the command's stdout open after the command exits: the runner returns
    at the command's exit, while that sleep still runs (had it waited for stdout's end, the sleep
    would be over).  The sleep is ended by its pid and start time: only what this test started."""
    runner = _runner(sshd_session, pinned_known_hosts, tmp_path)
    started: tuple[int, str | None] | None = None
    try:
        result = runner.run(["sh", "-c", "sleep 30 & echo $!"])
        assert result.exit_code == 0
        pid = int(result.stdout)
        started = (pid, identity(pid))
        assert started[1] is not None, "the command came back only once its background process had ended"
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0030\x00"  # the loopback server: this machine
    finally:
        if started is not None and started[1] is not None and identity(started[0]) == started[1]:
            os.kill(started[0], signal.SIGKILL)
        runner.close()
