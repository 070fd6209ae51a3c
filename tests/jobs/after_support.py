"""Shared by the tests of runs whose cluster is gone, repeated pulls and the .gitignore hint:
the CLI in this process, a tiny job (no TensorFlow) and a project holding it."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from gpuflow import clusters, jobs

# python job.py LINES [EXIT_CODE [WAIT]]: prints LINES numbered lines, writes outputs, exits with EXIT_CODE;
# with WAIT it first waits (after its first line) until a file `go` appears in its run directory.
JOB_SCRIPT = """\
import json, os, sys, time
lines = int(sys.argv[1])
code = int(sys.argv[2]) if len(sys.argv) > 2 else 0
wait = len(sys.argv) > 3
output_dir = os.environ["GPUFLOW_OUTPUT_DIR"]
with open(os.path.join(output_dir, "weights.bin"), "wb") as handle:
    handle.write(bytes(range(256)) * 40)
for number in range(lines):
    print(f"line {number}", flush=True)
    while wait and number == 0 and not os.path.exists(os.path.join(os.environ["GPUFLOW_RUN_DIR"], "go")):
        time.sleep(0.02)
with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
    json.dump({"lines": lines}, handle)
sys.exit(code)
"""


def cli(argv: list[str]) -> int:
    """`gpuflow ARGV` in this process, through the one error-mapping path."""
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def make_project(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "job.py").write_text(JOB_SCRIPT)
    return directory


@contextlib.contextmanager
def sandbox_cluster(project: Path, name: str) -> Iterator[None]:
    """A sandbox cluster ``name`` for the block, down after it (whatever is left of it)."""
    clusters.up(clusters.resolve_spec(name, {"sandbox": True}, project_dir=project))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            clusters.down(name, sandbox=True)


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def only_record() -> jobs.RunRecord:
    [record] = jobs.all_records()
    return record


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("gpuflow: error:")]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
