"""TensorBoard is an optional extra: without it `gpuflow tensorboard RUN` (the pulled copy, served here) is one
error line with the install hint, no traceback, a non-zero exit, and nothing started."""

from __future__ import annotations

import sys

from gpuflow.cli import app, run_app
from gpuflow.jobs.records import RunRecord, save_record


def test_without_tensorboard_here_one_line_says_how_to_install_it(gpuflow_home, tmp_path, monkeypatch, capsys):
    local = tmp_path / "project" / "runs" / "20261130-170000-ef56"
    (local / "outputs" / "tensorboard" / "train").mkdir(parents=True)
    save_record(RunRecord(
        run_id="20261130-170000-ef56", cluster="gone-box", base_dir="/home/ubuntu/gpuflow",
        remote_dir="/home/ubuntu/gpuflow/runs/20261130-170000-ef56", command=("python", "-m", "training.mnist_mlp"),
        project_dir=str(tmp_path / "project"), local_dir=str(local), started_at="2026-11-30T17:00:00Z",
    ))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec answers None

    code = run_app(app, ["tensorboard", "20261130-170000-ef56"])

    captured = capsys.readouterr()
    assert code != 0 and captured.out == ""
    error_lines = [line for line in captured.err.splitlines() if line.startswith("gpuflow: error:")]
    assert len(error_lines) == 1 and "TensorBoard is not installed here" in error_lines[0]
    assert "pip install 'gpuflow[tensorboard]'" in error_lines[0] and "Traceback" not in captured.err
