"""The supervisors' peer watch (gpuflow/jobs/peer_watch.py) with a hand-driven clock: what it decides, no sleeps."""

from __future__ import annotations

import json
import signal
import socket
import threading

from gpuflow.jobs import peer_watch
from gpuflow.jobs.peer_watch import PeerWatch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _watch(tmp_path, port, clock, signals):
    (tmp_path / "job.log").write_text("")
    config = {"index": 0, "listen": ["127.0.0.1", 0], "peers": [{"index": 1, "host": "127.0.0.1", "port": port}]}
    return PeerWatch(str(tmp_path), config, lambda run_dir, sig: signals.append(sig) or True, clock=clock)


class Peer:
    """A peer's watch answering with ``answer`` (None: it stops answering)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                connection.sendall((json.dumps(self.answer) + "\n").encode())

    def close(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone leaves it listening)
        except OSError:
            pass
        self.server.close()


def test_a_peer_that_never_answers_ends_the_job_after_the_start_grace_then_kill(tmp_path):
    clock, signals = Clock(), []
    watch = _watch(tmp_path, _closed_port(), clock, signals)
    assert watch.step() and signals == []
    clock.now = peer_watch.START_SECONDS - 1
    assert watch.step() and signals == []
    clock.now = peer_watch.START_SECONDS
    assert watch.step() and signals == [signal.SIGTERM]
    assert json.loads((tmp_path / "peer_failure.json").read_text())["node"] == 1
    assert "node 1 never answered in 60s" in (tmp_path / "job.log").read_text()
    clock.now += peer_watch.KILL_GRACE_SECONDS
    watch.step()
    assert signals == [signal.SIGTERM, signal.SIGKILL]


def test_a_peer_seen_then_silent_for_the_limit_is_a_failure(tmp_path):
    clock, signals = Clock(), []
    peer = Peer({"index": 1, "state": "running", "exit_code": None, "failure": None})
    watch = _watch(tmp_path, peer.port, clock, signals)
    watch.step()
    peer.close()
    clock.now = peer_watch.UNREACHABLE_SECONDS - 1
    watch.step()
    assert signals == []
    clock.now = peer_watch.UNREACHABLE_SECONDS
    watch.step()
    assert signals == [signal.SIGTERM]
    assert "did not answer for 20s" in json.loads((tmp_path / "peer_failure.json").read_text())["reason"]


def test_a_peer_that_ended_well_is_done_and_a_passed_on_failure_keeps_its_origin(tmp_path):
    clock, signals = Clock(), []
    peer = Peer({"index": 1, "state": "ended", "exit_code": 0, "failure": None})
    watch = _watch(tmp_path, peer.port, clock, signals)
    watch.step()
    assert watch.done == {1} and signals == []
    clock.now = 1000  # a peer that is done is not asked again: its silence is no failure
    peer.close()
    watch.step()
    assert signals == []

    other = tmp_path / "other"
    other.mkdir()
    told = Peer({"index": 1, "state": "ended", "exit_code": 143, "failure": {"node": 2, "reason": "failed: boom"}})
    watch = _watch(other, told.port, Clock(), signals)
    watch.step()
    assert json.loads((other / "peer_failure.json").read_text()) == {"node": 2, "reason": "failed: boom"}
    told.close()


def test_it_answers_how_its_job_stands(tmp_path):
    watch = _watch(tmp_path, _closed_port(), Clock(), [])
    assert watch.answer() == {"index": 0, "state": "running", "exit_code": None, "failure": None}
    (tmp_path / "job.ended").write_text("3\n")
    assert watch.answer()["state"] == "ended" and watch.answer()["exit_code"] == 3
