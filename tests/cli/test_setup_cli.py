"""`gpuflow setup` on the command line: the plan, --dry-run, --json, --sandbox, --delete, one-line errors."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import cli


@pytest.fixture
def sandbox(project, gpuflow_home):
    from infra.sandbox import in_process_sandbox

    with in_process_sandbox():
        yield project


def test_setup_in_the_sandbox_shows_the_plan_deploys_and_is_idempotent(sandbox, capsys):
    assert cli(["setup", "--sandbox"]) == 0
    captured = capsys.readouterr()
    assert "plan: create the account stack gpuflow-account in us-east-1 (RetentionDays=30)" in captured.err
    assert "  Add RunsBucket (AWS::S3::Bucket)" in captured.err and "  Add InstanceProfile" in captured.err
    assert "account stack gpuflow-account in us-east-1: created" in captured.out
    assert "bucket: s3://gpuflow-runs-123456789012-us-east-1 (runs expire after 30 days)" in captured.out

    assert cli(["setup", "--sandbox", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["outcome"] == "unchanged" and again["sandbox"] is True
    assert again["store"]["instance_profile_arn"].endswith(":instance-profile/gpuflow-instance-us-east-1")

    assert cli(["setup", "--sandbox", "--delete"]) == 0
    assert "deleted the account stack gpuflow-account in us-east-1" in capsys.readouterr().out
    assert cli(["setup", "--sandbox", "--delete"]) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_dry_run_prints_the_template_and_the_plan_and_deploys_nothing(sandbox, capsys):
    assert cli(["setup", "--sandbox", "--dry-run", "--retention-days", "7"]) == 0
    out = capsys.readouterr().out
    template, _, rest = out.partition("\nplan: ")
    assert json.loads(template)["Resources"]["RunsBucket"]["Type"] == "AWS::S3::Bucket"
    assert rest.startswith("create the account stack gpuflow-account in us-east-1 (RetentionDays=7)")
    assert out.rstrip().endswith("dry run: nothing was changed")
    assert cli(["setup", "--sandbox", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["outcome"] == "planned" and planned["store"] is None and len(planned["changes"]) == 4
    assert planned["template"]["Parameters"]["RetentionDays"]["Default"] == 30
    assert cli(["setup", "--sandbox", "--delete", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "absent"  # the dry runs left no stack


@pytest.mark.parametrize(("argv", "message"), [
    (["setup", "--force"], "--force goes with --delete"),
    (["setup", "--delete", "--dry-run"], "--dry-run shows a deployment"),
    (["setup", "--retention-days", "0"], "--retention-days 0 is out of range"),
    (["setup", "--region", "mars-north-1"], "unknown AWS region 'mars-north-1'"),
    (["setup", "--delete", "--region", "mars-north-1"], "unknown AWS region 'mars-north-1'"),
])
def test_usage_errors_are_one_line_and_exit_2(project, gpuflow_home, capsys, argv, message):
    assert cli(argv + ["--sandbox"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("gpuflow: error")]) == 1


def test_delete_with_runs_in_the_bucket_refuses_in_one_line(sandbox, capsys):
    import boto3

    assert cli(["setup", "--sandbox", "--json"]) == 0
    bucket = json.loads(capsys.readouterr().out)["store"]["bucket"]
    boto3.client("s3", region_name="us-east-1").put_object(Bucket=bucket, Key="runs/o/r/manifest.json", Body=b"{}")
    assert cli(["setup", "--sandbox", "--delete"]) == 2
    err = capsys.readouterr().err
    assert "still holds 1 object(s) of runs: the account stack was not deleted" in err and "Traceback" not in err
    assert "`gpuflow setup --delete --force --region us-east-1 --sandbox`" in err
    assert cli(["setup", "--sandbox", "--delete", "--force"]) == 0
    assert "(1 object(s) deleted from its bucket)" in capsys.readouterr().out
