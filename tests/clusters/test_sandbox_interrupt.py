"""`gpuflow sandbox interrupt`: what it refuses (one line, non-zero), and a spot reclaim of a
node that lives in another process -- the detached sandbox server of `gpuflow up --sandbox`,
and the in-process cloud of `gpuflow run --up --sandbox --down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuflow.clusters.record import Phase, _save, _store
from gpuflow.records import Cluster, Node
from tests.jobs.spot_helpers import SPOT_JOB, wait_until

REPO = Path(__file__).resolve().parents[2]


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def _record(name: str, *, sandbox: bool, instance_ids=("i-0aaaaaaaaaaaaaaa1",)) -> Cluster:
    cluster = Cluster(name=name, region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                      nodes=tuple(Node(instance_id, "running") for instance_id in instance_ids), sandbox=sandbox)
    _save(_store(), cluster, Phase.UP, "launch-1")
    return cluster


def _one_line_error(capfd, code: int) -> str:
    err = capfd.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    return err


def test_it_refuses_what_it_cannot_interrupt_in_one_line(gpuflow_home, capfd):
    _record("real", sandbox=False)
    _record("gone", sandbox=True)
    _record("orphan", sandbox=True, instance_ids=("i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2"))
    (gpuflow_home / "sandbox" / "orphan" / "i-0aaaaaaaaaaaaaaa1").mkdir(parents=True)
    assert "not a sandbox cluster" in _one_line_error(capfd, cli(["sandbox", "interrupt", "real"]))
    assert "no cluster named 'nosuch'" in _one_line_error(capfd, cli(["sandbox", "interrupt", "nosuch"]))
    assert "already terminated" in _one_line_error(capfd, cli(["sandbox", "interrupt", "gone"]))
    assert "has no instance 'i-0bbbbbbbbbbbbbbb9'" in _one_line_error(
        capfd, cli(["sandbox", "interrupt", "orphan", "--node", "i-0bbbbbbbbbbbbbbb9"]))
    assert "already terminated" in _one_line_error(
        capfd, cli(["sandbox", "interrupt", "orphan", "--node", "i-0aaaaaaaaaaaaaaa2"]))
    # Its directory is there, but no process hosts its metadata service any more.
    assert "no metadata service answers" in _one_line_error(capfd, cli(["sandbox", "interrupt", "orphan"]))
    for bad in ("-1", "nan", "inf", "100000"):
        assert "--notice-seconds" in _one_line_error(
            capfd, cli(["sandbox", "interrupt", "orphan", "--notice-seconds", bad]))
    assert not list((gpuflow_home / "sandbox").rglob("spot-interruption.json"))  # nothing was asked of any node


@pytest.fixture
def spot_project(tmp_path) -> Path:
    project = tmp_path / "spot-project"
    project.mkdir()
    (project / "spotjob.py").write_text(SPOT_JOB)
    return project


def _job_dir(home: Path, cluster: str, *, after: str = "epoch 0 step 2") -> Path:
    def started() -> Path | None:
        for log in home.glob(f"sandbox/{cluster}/i-*/runs/*/job.log"):
            if after in log.read_text():
                return log.parent
        return None

    return wait_until(started, timeout=120, what="the job's third step")


@pytest.mark.slow
def test_a_node_of_up_sandbox_is_reclaimed_by_its_sandbox_server(gpuflow_home, spot_project, capfd, monkeypatch):
    """`up --sandbox` starts the detached moto server: it hosts the node's IMDS and reclaims it
    (the CLI runs in this process, which has no moto of its own: everything goes to the server)."""
    from infra.sandbox import read_server_record, stop_sandbox

    monkeypatch.chdir(spot_project)
    monkeypatch.setenv("GPUFLOW_IMDS_POLL_SECONDS", "0.1")
    monkeypatch.setenv("GPUFLOW_SANDBOX_IDLE_SECONDS", "30")
    try:
        assert cli(["up", "spotbox", "--sandbox", "--spot"]) == 0
        assert cli(["run", "spotbox", "--detach", "--", "python", "spotjob.py", "20", "50", "0.05"]) == 0
        run_dir = _job_dir(gpuflow_home, "spotbox")
        node_dir = run_dir.parent.parent
        capfd.readouterr()
        assert cli(["sandbox", "interrupt", "spotbox", "--notice-seconds", "3", "--json"]) == 0
        said = json.loads(capfd.readouterr().out)
        assert said["instance_id"] == node_dir.name and said["notice"]["action"] == "terminate"
        # The job saw the notice through the node's IMDS (served by the server process) and saved.
        wait_until(lambda: (run_dir / "exit_code").exists() or not run_dir.exists(), what="the job's end")
        assert (run_dir / "exit_code").read_text().strip() == "75"
        assert json.loads((run_dir / "interruption.json").read_text())["notice"] == said["notice"]
        # A second interruption of the same node is refused while the first runs.
        assert "already being interrupted" in _one_line_error(capfd, cli(["sandbox", "interrupt", "spotbox"]))
        wait_until(lambda: not node_dir.exists(), timeout=30, what="the node's directory to go")
        import boto3

        record = read_server_record(gpuflow_home)
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{record.port}")

        def described() -> dict:
            return ec2.describe_instances(InstanceIds=[said["instance_id"]])["Reservations"][0]["Instances"][0]

        # The node's processes and directory go first, then TerminateInstances: wait for that call too.
        wait_until(lambda: described()["State"]["Name"] == "terminated", timeout=30, what="the instance's termination")
        instance = described()
        assert instance["State"]["Name"] == "terminated"
        assert instance["StateReason"]["Code"] == "Server.SpotInstanceTermination"
        assert "already terminated" in _one_line_error(capfd, cli(["sandbox", "interrupt", "spotbox"]))
        assert cli(["down", "spotbox", "--sandbox", "--yes"]) == 0
    finally:
        stop_sandbox(gpuflow_home)


@pytest.mark.slow
def test_the_in_process_cloud_of_run_up_down_is_interrupted_from_another_process(gpuflow_home, spot_project, capfd):
    env = {**os.environ, "GPUFLOW_HOME": str(gpuflow_home), "PYTHONPATH": str(REPO), "GPUFLOW_IMDS_POLL_SECONDS": "0.1"}
    run = subprocess.Popen(
        [sys.executable, "-m", "gpuflow", "run", "--up", "--sandbox", "--spot", "--down", "ci-box", "--", "python",
         "spotjob.py", "20", "50", "0.05"],
        cwd=spot_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        run_dir = _job_dir(gpuflow_home, "ci-box")
        assert cli(["sandbox", "interrupt", "ci-box", "--notice-seconds", "2"]) == 0
        assert "spot interruption notice served" in capfd.readouterr().out
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 75, err
    assert "interrupted: checkpoint saved at epoch" in out
    assert "spot interruption notice (terminate at" in err
    pulled = spot_project / "runs" / run_dir.name
    assert json.loads((pulled / "outputs" / "checkpoint" / "state.json").read_text())["complete"] is True
    assert not (gpuflow_home / "sandbox" / "ci-box").exists()  # --down: nothing left of the node
