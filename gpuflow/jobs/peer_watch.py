"""A multi-node run's watchdog, on the nodes: each worker's supervisor watches its peers over the worker network.

Why on the nodes and not in gpuflow's follow loop: a run goes on while the
laptop sleeps or is closed, and a worker that died must not leave the others
waiting in a collective (holding GPUs, feeding the dead-man's switch) until
someone looks.  Why every supervisor and not only the chief's: the chief's node
can die too; with every node watching every other, whichever dies, the others
end within :data:`UNREACHABLE_SECONDS` (a whole node gone) or
:data:`POLL_SECONDS` (a job that ended badly).

Started by the supervisor (``python -I -S -c SCRIPT RUN_DIR``, the source of
:mod:`gpuflow.procs` first) when the run directory holds ``peers.json``
(``{"index": I, "listen": [HOST, PORT], "peers": [{"index": J, "host": H, "port": P}, ...]}``).
It answers on ``listen`` with one JSON line, its state: ``{"index", "state":
"running"|"ended", "exit_code", "failure"}``, and asks each peer the same every
:data:`POLL_SECONDS`.  A peer whose job ended with a non-zero code, a peer that
reports a failure (the first one, passed on as is), or one that does not answer
for :data:`UNREACHABLE_SECONDS` (:data:`START_SECONDS` before it first answered)
is a failure: it is written to ``peer_failure.json``, said in ``job.log``, and
this node's job gets SIGTERM, then SIGKILL after :data:`KILL_GRACE_SECONDS`.
A peer that ended with 0 is done.  When this node's job ends (the supervisor
writes ``job.ended``), the watch keeps answering for :data:`LINGER_SECONDS`, so
that every peer learns how it ended, then exits (at once when it ended well after
every peer did); it also exits when its supervisor is gone.  Standard library only: it runs with the job's interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

PEERS_NAME = "peers.json"
ENDED_NAME = "job.ended"
PEER_FAILURE_NAME = "peer_failure.json"
POLL_SECONDS = 0.5
UNREACHABLE_SECONDS = 20.0
START_SECONDS = 60.0
LINGER_SECONDS = 2.0
KILL_GRACE_SECONDS = 10.0
ASK_TIMEOUT_SECONDS = 2.0


def _read_ended(run_dir):
    try:
        with open(os.path.join(run_dir, ENDED_NAME)) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _write_json(path, document):
    temporary = "%s.tmp.%d" % (path, os.getpid())
    with open(temporary, "w") as handle:
        json.dump(document, handle)
    os.replace(temporary, path)


def ask_peer(host, port, timeout=ASK_TIMEOUT_SECONDS):
    """A peer's answer (a dict), or None when it does not answer."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as connection:
            connection.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 65536:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data.decode())
        return answer if isinstance(answer, dict) else None
    except (OSError, ValueError):
        return None


class PeerWatch:
    """One node's watch: its answers and its view of its peers."""

    def __init__(self, run_dir, config, signal_group, clock=time.monotonic):
        self.run_dir = run_dir
        self.index = int(config["index"])
        self.listen = (str(config["listen"][0]), int(config["listen"][1]))
        self.peers = [(int(peer["index"]), str(peer["host"]), int(peer["port"])) for peer in config["peers"]]
        self.signal_group = signal_group
        self.clock = clock
        self.failure = None  # {"node": J, "reason": "..."}
        self.failed_at = None
        self.killed = False
        self.started = clock()
        self.last_answer = {}
        self.done = set()
        self.ended_at = None
        self.lock = threading.Lock()

    def answer(self):
        code = _read_ended(self.run_dir)
        with self.lock:
            failure = self.failure
        return {"index": self.index, "state": "running" if code is None else "ended", "exit_code": code,
                "failure": failure}

    def serve(self, server):
        while True:
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                connection.settimeout(ASK_TIMEOUT_SECONDS)
                connection.sendall((json.dumps(self.answer()) + "\n").encode())
            except OSError:
                pass
            finally:
                connection.close()

    def fail(self, node, reason):
        with self.lock:
            if self.failure is not None:
                return
            self.failure = {"node": int(node), "reason": str(reason)}
        self.failed_at = self.clock()
        _write_json(os.path.join(self.run_dir, PEER_FAILURE_NAME), self.failure)
        try:
            with open(os.path.join(self.run_dir, "job.log"), "a") as log:
                log.write("gpuflow: node %d %s: ending this worker (node %d)\n" % (node, reason, self.index))
        except OSError:
            pass
        self.signal_group(self.run_dir, signal.SIGTERM)

    def check_peers(self):
        """Ask every peer not yet done once; a failure found ends this node's job."""
        for index, host, port in self.peers:
            if index in self.done or self.failure is not None:
                continue
            answer = ask_peer(host, port)
            now = self.clock()
            if answer is None:
                if index in self.last_answer:
                    if now - self.last_answer[index] >= UNREACHABLE_SECONDS:
                        self.fail(index, "did not answer for %gs (its instance or its supervisor is gone)"
                                  % UNREACHABLE_SECONDS)
                elif now - self.started >= START_SECONDS:
                    self.fail(index, "never answered in %gs (its job did not start there)" % START_SECONDS)
                continue
            self.last_answer[index] = now
            failure = answer.get("failure")
            if isinstance(failure, dict) and "node" in failure:
                self.fail(int(failure["node"]), str(failure.get("reason", "failed")))
            elif answer.get("state") == "ended":
                code = answer.get("exit_code")
                if code == 0:
                    self.done.add(index)
                else:
                    self.fail(index, "failed: its job exited with code %s" % code)

    def step(self):
        """One round: False once this watch is to exit."""
        ended = _read_ended(self.run_dir)
        if ended is not None:
            if ended == 0 and self.failure is None:
                self.check_peers()  # the peers that ended well too need not be told
                if self.failure is None and len(self.done) == len(self.peers):
                    return False
            if self.ended_at is None:
                self.ended_at = self.clock()
            return self.clock() - self.ended_at < LINGER_SECONDS
        if self.failure is None:
            self.check_peers()
        elif not self.killed and self.clock() - self.failed_at >= KILL_GRACE_SECONDS:
            self.killed = True
            self.signal_group(self.run_dir, signal.SIGKILL)
        return True


def peer_main(argv, signal_group, sleep=time.sleep):
    run_dir = argv[0]
    with open(os.path.join(run_dir, PEERS_NAME)) as handle:
        config = json.load(handle)
    watch = PeerWatch(run_dir, config, signal_group)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(watch.listen)
    server.listen(16)
    server.settimeout(0.5)
    threading.Thread(target=watch.serve, args=(server,), daemon=True).start()
    parent = os.getppid()
    while os.getppid() == parent and watch.step():
        sleep(POLL_SECONDS)
    server.close()
    return 0

