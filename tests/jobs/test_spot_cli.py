"""The spot-interruption path end to end through the CLI, in the sandbox cloud: a
mock IMDSv2 process on 127.0.0.1 serves 404s, then a notice; the supervisor's
watcher stops the stand-in job, which saves and exits 75; `gpuflow run` says
`interrupted (resumable at epoch E step S)` and exits 75; `gpuflow run --resume`
finishes it, every step trained once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpuflow import clusters, jobs
from infra.sandbox import in_process_sandbox
from tests.jobs.spot_helpers import imds, spot_job_args, spot_project, trained_steps  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def test_notice_checkpoint_exit_75_then_run_resume_completes(spot_project, imds, monkeypatch, capfd):
    monkeypatch.chdir(spot_project)
    imds.notice(after=4)
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("spotbox", {"sandbox": True}, project_dir=spot_project))
        try:
            code = cli(["run", "spotbox", "--", *spot_job_args(20, 2, 0.05)])
            first = capfd.readouterr()
            assert code == 75, first.err
            [record] = jobs.all_records()
            state = json.loads((Path(record.local_dir) / "outputs" / "checkpoint" / "state.json").read_text())
            shown = f"interrupted (resumable at epoch {state['epoch']} step {state['step']})"
            assert f"gpuflow: run {record.run_id} {shown} after a spot interruption notice" in first.err
            assert "error:" not in first.err and f"gpuflow run --resume {record.run_id}" in first.err
            assert f"interrupted: checkpoint saved at epoch {state['epoch']} step {state['step']}" in first.out

            assert cli(["runs"]) == 0
            assert re.search(rf"{record.run_id}\s+spotbox\s+{re.escape(shown)}", capfd.readouterr().out)
            assert cli(["logs", record.run_id]) == 0
            logs = capfd.readouterr()
            assert logs.out == first.out and shown in logs.err

            imds.clear_notice()
            assert cli(["run", "--resume", record.run_id]) == 0, capfd.readouterr().err
            resumed = capfd.readouterr()
            assert resumed.out.startswith(f"resumed after epoch {state['epoch']} step {state['step']}\n")
            assert resumed.out.endswith("finished\n")
            assert f"run {record.run_id} succeeded" in resumed.err
            local = Path(record.local_dir)
            assert trained_steps(local / "outputs") == [(e, s) for e in range(2) for s in range(20)]
            assert (local / "job.log").read_text() == first.out + resumed.out  # the same log, appended
            manifest = json.loads((local / "manifest.json").read_text())
            assert manifest["exit_code"] == 0 and manifest["resumes"][0]["previous_exit_code"] == 75

            assert cli(["run", "--resume", record.run_id]) == 2
            assert f"run {record.run_id} succeeded: nothing to resume" in capfd.readouterr().err
            assert cli(["run", "--resume", record.run_id, "spotbox", "--", "python", "x.py"]) == 2
            assert "--resume RUN continues the run's own command on its own cluster: drop NAME/MODULE, a command" in (
                capfd.readouterr().err
            )
        finally:
            clusters.down("spotbox", sandbox=True)


def test_stop_without_grace_waits_two_minutes_before_sigkill(monkeypatch, capfd):
    """`gpuflow stop` is save and stop: without --grace the job gets EC2's two minutes to save."""
    from gpuflow.errors import RunNotFound

    seen = {}

    def stop(run_id, *, grace_seconds):
        seen["grace"] = grace_seconds
        raise RunNotFound("spy")

    monkeypatch.setattr(jobs, "stop", stop)
    assert cli(["stop", "20261130-000000-abcd"]) == 4
    assert seen == {"grace": 120.0}
    assert cli(["stop", "20261130-000000-abcd", "--grace", "3"]) == 4
    assert seen == {"grace": 3.0}
    capfd.readouterr()


def test_run_up_down_interrupted_exits_75_pulls_the_checkpoint_and_leaves_nothing(spot_project, imds, monkeypatch, capfd):
    monkeypatch.chdir(spot_project)
    imds.notice(after=3)
    with in_process_sandbox():
        code = cli(["run", "--up", "--sandbox", "--down", "spot-ci", "--", *spot_job_args(20, 2, 0.05)])
        captured = capfd.readouterr()
        assert code == 75, captured.err
        import boto3

        ec2 = boto3.client("ec2", region_name="us-east-1")
        states = [i["State"]["Name"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
        assert states == ["terminated"]
    [record] = jobs.all_records()
    state = json.loads((Path(record.local_dir) / "outputs" / "checkpoint" / "state.json").read_text())
    assert f"interrupted (resumable at epoch {state['epoch']} step {state['step']})" in captured.err
    assert "the cluster is torn down (--down), so `gpuflow run --resume` cannot continue it there" in captured.err
    assert "error:" not in captured.err
