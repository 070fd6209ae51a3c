"""Helpers for the `run --recover` tests: a stand-in job that checkpoints after every step
into a store outside the node (what the durable store gives a real run: its latest
committed checkpoint, restored on a new node before the job starts), no TensorFlow.

``recoverjob.py STEPS DELAY [CODE]`` trains STEPS "steps" (a sleep each); after each it
appends the step to ``$STORE/trained.txt`` and writes ``$STORE/state.json`` and its run's
``outputs/checkpoint/state.json`` (``{"format":1,"epoch":0,"step":S,"complete":true}``).
Started again it continues after the store's step (``resumed after step S``).  On SIGTERM
or SIGUSR1 it finishes the step, saves and exits 75.  With CODE it exits CODE instead of
finishing (every time: a job failing on its own), after its steps; with ``$FAIL_ONCE_AT`` it exits 3
at that step the first time only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RECOVER_JOB = """\
import json, os, signal, sys, time
steps, delay = int(sys.argv[1]), float(sys.argv[2])
code = int(sys.argv[3]) if len(sys.argv) > 3 else 0
store = os.environ["STORE"]
checkpoint = os.path.join(os.environ["GPUFLOW_OUTPUT_DIR"], "checkpoint")
os.makedirs(checkpoint, exist_ok=True)
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
signal.signal(signal.SIGTERM, lambda *_: asked.append(1))
def save(step):
    state = json.dumps({"format": 1, "epoch": 0, "step": step, "complete": True})
    for path in (os.path.join(store, "state.json"), os.path.join(checkpoint, "state.json")):
        with open(path + ".tmp", "w") as handle:
            handle.write(state)
        os.replace(path + ".tmp", path)
done = -1
try:
    with open(os.path.join(store, "state.json")) as handle:
        done = json.load(handle)["step"]
    print("resumed after step %d" % done, flush=True)
except FileNotFoundError:
    print("started", flush=True)
for step in range(done + 1, steps):
    time.sleep(delay)
    with open(os.path.join(store, "trained.txt"), "a") as handle:
        handle.write("%d\\n" % step)
    save(step)
    print("step %d" % step, flush=True)
    if step == int(os.environ.get("FAIL_ONCE_AT", "-1")) and not os.path.exists(os.path.join(store, "failed-once")):
        open(os.path.join(store, "failed-once"), "w").close()
        print("failing once at step %d" % step, flush=True)
        sys.exit(3)
    if asked:
        print("interrupted: checkpoint saved at epoch 0 step %d (resumable)" % step, flush=True)
        sys.exit(75)
if code:
    print("failing with %d" % code, flush=True)
    sys.exit(code)
print("finished", flush=True)
"""


def recover_job_args(steps: int, delay: float, code: int = 0) -> list[str]:
    return ["python", "recoverjob.py", str(steps), str(delay), *([str(code)] if code else [])]


def trained(store: Path) -> list[int]:
    path = store / "trained.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def step_count(store: Path) -> int:
    return len(trained(store))


@pytest.fixture
def recover_project(tmp_path) -> Path:
    directory = tmp_path / "recover-project"
    directory.mkdir()
    (directory / "recoverjob.py").write_text(RECOVER_JOB)
    return directory


@pytest.fixture
def store(tmp_path) -> Path:
    directory = tmp_path / "durable-store"
    directory.mkdir()
    return directory


def manifest_of(local_dir: str) -> dict:
    return json.loads((Path(local_dir) / "manifest.json").read_text())
