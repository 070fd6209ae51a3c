"""Helpers for the spot-interruption tests: the mock IMDSv2 process and a stand-in
training job that honours the training side's contract (no TensorFlow).

The stand-in job (``spotjob.py STEPS_PER_EPOCH EPOCHS DELAY [ignore-term]``)
trains "steps" (a sleep each), appending ``E S`` to ``$GPUFLOW_OUTPUT_DIR/trained.txt``
for every step it finishes.  On SIGTERM or SIGUSR1 it finishes the current
step, writes ``checkpoint/state.json`` (``{"format":1,"epoch":E,"step":S,"complete":true}``,
atomically), prints ``interrupted: checkpoint saved at epoch E step S (resumable)``
and exits 75.  Started again with the same output directory it continues at
the next step.  With ``ignore-term`` it ignores SIGTERM (for the SIGKILL after ``--grace``);
with ``gate=PATH`` it waits for PATH to exist before it finishes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuflow.jobs import RunTarget
from gpuflow.records import Cluster
from gpuflow.transport.local import LocalRunner

MOCK = Path(__file__).with_name("imds_mock.py")

SPOT_JOB = """\
import json, os, signal, sys, time
steps, epochs, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
output = os.environ["GPUFLOW_OUTPUT_DIR"]
checkpoint = os.path.join(output, "checkpoint")
state_path = os.path.join(checkpoint, "state.json")
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
signal.signal(signal.SIGTERM, signal.SIG_IGN if "ignore-term" in sys.argv[4:] else (lambda *_: asked.append(1)))
gates = [arg[len("gate="):] for arg in sys.argv[4:] if arg.startswith("gate=")]
done = (-1, steps - 1)
if os.path.exists(state_path):
    with open(state_path) as handle:
        state = json.load(handle)
    done = (state["epoch"], state["step"])
    print("resumed after epoch %d step %d" % done, flush=True)
else:
    print("started", flush=True)
os.makedirs(checkpoint, exist_ok=True)
for epoch in range(epochs):
    for step in range(steps):
        if (epoch, step) <= done:
            continue
        time.sleep(delay)
        with open(os.path.join(output, "trained.txt"), "a") as handle:
            handle.write("%d %d\\n" % (epoch, step))
        print("epoch %d step %d" % (epoch, step), flush=True)
        if asked:
            with open(state_path + ".tmp", "w") as handle:
                json.dump({"format": 1, "epoch": epoch, "step": step, "complete": True}, handle)
            os.replace(state_path + ".tmp", state_path)
            print("interrupted: checkpoint saved at epoch %d step %d (resumable)" % (epoch, step), flush=True)
            sys.exit(75)
while gates and not os.path.exists(gates[0]):  # the test says when it may finish (or stops it here)
    if asked:
        with open(state_path + ".tmp", "w") as handle:
            json.dump({"format": 1, "epoch": epochs - 1, "step": steps - 1, "complete": True}, handle)
        os.replace(state_path + ".tmp", state_path)
        print("interrupted: checkpoint saved at epoch %d step %d (resumable)" % (epochs - 1, steps - 1), flush=True)
        sys.exit(75)
    time.sleep(0.02)
print("finished", flush=True)
"""


def spot_job_args(steps: int = 20, epochs: int = 2, delay: float = 0.05, *extra: str) -> list[str]:
    return ["python", "spotjob.py", str(steps), str(epochs), str(delay), *extra]


def trained_steps(output_dir: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in (output_dir / "trained.txt").read_text().splitlines()]


class MockImds:
    """The mock IMDSv2 process; ``control`` is its control directory."""

    def __init__(self, control: Path, process: subprocess.Popen, port: int) -> None:
        self.control = control
        self.process = process
        self.endpoint = f"http://127.0.0.1:{port}"

    def notice(self, after: int = 0, action: str = "terminate") -> dict:
        notice = {"action": action, "time": "2026-11-30T15:00:00Z"}
        (self.control / "instance-action.after").write_text(str(after))
        (self.control / "instance-action.json").write_text(json.dumps(notice))
        return notice

    def clear_notice(self) -> None:
        (self.control / "instance-action.json").unlink()

    def rebalance(self) -> dict:
        notice = {"noticeTime": "2026-11-30T14:55:00Z"}
        (self.control / "rebalance.json").write_text(json.dumps(notice))
        return notice

    def requests(self) -> list[str]:
        path = self.control / "requests.log"
        return path.read_text().splitlines() if path.exists() else []


@contextlib.contextmanager
def mock_imds(control: Path) -> Iterator[MockImds]:
    control.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, str(MOCK), str(control)], stdout=subprocess.PIPE)
    try:
        port = int(process.stdout.readline())
        yield MockImds(control, process, port)
    finally:
        process.kill()
        process.wait()


def wait_until(condition, timeout: float = 30, what: str = "condition"):
    """Poll ``condition`` until it is truthy (a bound, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


# ------------------------------------------------------------------ fixtures (imported by the test modules)


def spot_cluster() -> Cluster:
    return Cluster(name="spotbox", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                   price_per_hour=1.006)


@pytest.fixture
def spot_project(tmp_path) -> Path:
    directory = tmp_path / "spot-project"
    directory.mkdir()
    (directory / "spotjob.py").write_text(SPOT_JOB)
    return directory


@pytest.fixture
def spot_target(tmp_path) -> RunTarget:
    """A LocalRunner "instance": the sandbox's transport."""
    base = tmp_path / "spot-instance"

    def connect() -> LocalRunner:
        return LocalRunner(base)

    def push(project_dir: Path) -> None:
        runner = connect()
        for path in sorted(project_dir.iterdir()):
            if path.is_file():
                runner.put_bytes(path.read_bytes(), f"{runner.base_dir}/project/{path.name}")

    return RunTarget(cluster=spot_cluster(), connect=connect, sync_project=push)


@pytest.fixture
def imds(tmp_path, monkeypatch) -> Iterator[MockImds]:
    """A running mock IMDSv2 that jobs started from this test's process watch (polled every 0.2 s)."""
    with mock_imds(tmp_path / "imds") as server:
        monkeypatch.setenv("GPUFLOW_IMDS_ENDPOINT", server.endpoint)
        monkeypatch.setenv("GPUFLOW_IMDS_POLL_SECONDS", "0.2")
        yield server
