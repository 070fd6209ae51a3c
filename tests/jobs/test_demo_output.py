"""`gpuflow demo` quiets TensorFlow's C++ logging for its own job only (a user's job gets it
only when asked, with `run --env`), and prints no path that is gone once the demo has ended."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from gpuflow import clusters, jobs
from gpuflow.errors import UsageError
from gpuflow.jobs import demo
from infra.sandbox import in_process_sandbox

ENV_JOB = """\
import json, os, sys
out = os.environ["GPUFLOW_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
json.dump({"tf": os.environ.get("TF_CPP_MIN_LOG_LEVEL"), "mine": os.environ.get("MY_SETTING")},
          open(os.path.join(out, "env.json"), "w"))
json.dump({"test_accuracy": 0.5, "best_epoch": 1}, open(os.path.join(out, "metrics.json"), "w"))
print("outputs in " + out, flush=True)
print("wrote " + os.path.join(out, "env.json"), flush=True)
"""


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


@pytest.fixture
def project(tmp_path, monkeypatch):
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "envjob.py").write_text(ENV_JOB)
    monkeypatch.chdir(directory)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # the suite sets it; a user's shell need not
    return directory


def test_the_demo_job_alone_gets_tensorflow_quieted_and_no_vanished_path_is_printed(project, monkeypatch, gpuflow_home):
    """The demo with its module swapped for a tiny job that reports its environment and prints its
    output paths as the training modules do: what reaches the terminal names the pulled copies."""
    monkeypatch.setattr(demo, "DEMO_MODULE", "envjob")
    out = io.BytesIO()
    said: list[str] = []
    summary = demo.run_demo(out=out, say=said.append, epochs=1, project_dir=project)

    pulled = json.loads((summary.local_dir / "outputs" / "env.json").read_text())
    assert pulled == {"tf": "3", "mine": None}
    printed = out.getvalue().decode() + "\n".join(said) + "\n".join(summary.lines())
    sandbox = str(gpuflow_home / "sandbox")
    assert sandbox not in printed and str(Path(sandbox).resolve()) not in printed
    assert f"outputs in {summary.local_dir / 'outputs'}\n" in out.getvalue().decode()
    for path in re.findall(r"(/[^\s:;'\"()]+)", printed):
        if path.startswith(str(project)) or path.startswith(str(gpuflow_home)):
            assert Path(path).exists(), f"printed {path}, which does not exist after the demo"
    # Pictures a run did not make are not listed as if they existed.
    assert not any("cam.png" in line or "confusion" in line for line in summary.lines())
    assert not (gpuflow_home / "sandbox" / summary.cluster).exists()


def test_a_user_job_gets_tensorflow_quieted_only_when_asked(project, capfd):
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("box", {"sandbox": True}, project_dir=project))
        try:
            assert cli(["run", "box", "--", "python", "envjob.py"]) == 0
            assert cli(["run", "box", "--env", "TF_CPP_MIN_LOG_LEVEL=3", "--env", "MY_SETTING=a b $(x)",
                        "--", "python", "envjob.py"]) == 0
            capfd.readouterr()
            for bad in ("GPUFLOW_RUN_ID=x", "1X=2", "NOEQUALS"):
                assert cli(["run", "box", "--env", bad, "--", "python", "envjob.py"]) == UsageError.exit_code
                err = capfd.readouterr().err
                assert err.count("\n") == 1 and "--env" in err, err
        finally:
            clusters.down("box", sandbox=True)
    # Told apart by what they were given: two short runs can start within one second (started_at's unit).
    [plain] = [record for record in jobs.all_records() if not record.job_env]
    [asked] = [record for record in jobs.all_records() if record.job_env]
    assert json.loads((Path(plain.local_dir) / "outputs" / "env.json").read_text()) == {"tf": None, "mine": None}
    assert json.loads((Path(asked.local_dir) / "outputs" / "env.json").read_text()) == {"tf": "3", "mine": "a b $(x)"}
    assert len(jobs.all_records()) == 2  # the refused ones started nothing
