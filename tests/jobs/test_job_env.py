"""A run's extra environment (``env`` of gpuflow.jobs.run / start_run): checked, and it reaches the job."""

from __future__ import annotations

import io
import sys

import pytest

from gpuflow.errors import UsageError
from gpuflow.jobs import run
from gpuflow.jobs.records import RunTarget
from gpuflow.jobs.start import checked_job_env
from gpuflow.records import Cluster, Node
from gpuflow.transport.local import LocalRunner


@pytest.mark.parametrize("env", [
    {"GPUFLOW_OUTPUT_DIR": "/tmp/elsewhere"},  # gpuflow's own
    {"GPUFLOW_RUN_DIR": "x"},
    {"PYTHONPATH": "/x"},
    {"AWS_SECRET_ACCESS_KEY": "k"},  # no credentials to jobs
    {"AWS_PROFILE": "p"},
    {"1BAD": "x"},
    {"A-B": "x"},
    {"": "x"},
    {"A B": "x"},
    {"NUMBER": 1},
    {"NUL": "a\0b"},
])
def test_refused(env):
    with pytest.raises(UsageError):
        checked_job_env(env)


def test_accepted():
    assert checked_job_env({"GPUFLOW_SMOKE": "1", "AWS_REGION": "eu-west-1", "MY_VAR": "a b $(c)"}) == {
        "GPUFLOW_SMOKE": "1", "AWS_REGION": "eu-west-1", "MY_VAR": "a b $(c)"}
    assert checked_job_env(None) == {}


def test_the_variables_reach_the_job_quoted(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_VAR", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    (project / "job.py").write_text("import os\nprint(repr(os.environ.get('MY_VAR')), os.environ.get('GPUFLOW_SMOKE'))\n")
    node_dir = tmp_path / "node"
    cluster = Cluster(name="envbox", region="us-east-1", instance_type="g5.xlarge", ami="ami-0",
                      nodes=(Node("i-0123456789abcdef0", "running"),), sandbox=True)

    def sync_project(directory):
        import shutil

        shutil.copytree(directory, node_dir / "project", dirs_exist_ok=True)

    target = RunTarget(cluster=cluster, connect=lambda: LocalRunner(node_dir, python=sys.executable),
                       sync_project=sync_project)
    out = io.BytesIO()
    outcome = run(target, project_dir=project, module=None, args=["python", "job.py"], out=out,
                  env={"MY_VAR": "a 'b' $(c)", "GPUFLOW_SMOKE": "1"}, poll_interval=0.05)
    assert outcome.exit_code == 0
    assert b"\"a 'b' $(c)\" 1" in out.getvalue()
