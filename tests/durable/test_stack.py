"""`gpuflow setup`: the account stack deployed through a change set, idempotent, dry-run, delete, failures."""

from __future__ import annotations

import json

import boto3
import pytest

from gpuflow import clusters
from gpuflow.durable import stack
from gpuflow.errors import CloudError, UsageError
from infra.account_stack import STACK_NAME
from tests.infra.cloud import REGION, leftovers, make_spec


def _stacks() -> list[str]:
    client = boto3.client("cloudformation", region_name=REGION)
    return [item["StackStatus"] for item in client.list_stacks()["StackSummaries"]
            if item["StackName"] == STACK_NAME and item["StackStatus"] != "DELETE_COMPLETE"]


def _buckets() -> list[str]:
    return [bucket["Name"] for bucket in boto3.client("s3", region_name=REGION).list_buckets()["Buckets"]]


def _roles() -> list[str]:
    return [role["RoleName"] for role in boto3.client("iam").list_roles()["Roles"] if role["RoleName"].startswith("gpuflow")]


def test_setup_creates_then_changes_nothing_then_updates(cloud, provisioners, api_calls, gpuflow_home):
    shown = []
    created = stack.setup(REGION, provisioner_factory=provisioners, show_plan=shown.append)
    assert created.outcome is stack.SetupOutcome.CREATED and created.kind == "CREATE"
    assert sorted(change.logical_id for change in shown[0].changes) == [
        "InstanceProfile", "InstanceRole", "RunsBucket", "RunsBucketPolicy"]
    assert all(change.action == "Add" for change in shown[0].changes)
    store = created.store
    assert store is not None and store.bucket in _buckets() and store.role_name in _roles()
    assert store.instance_profile_arn.endswith(f":instance-profile/{store.instance_profile_name}")
    iam = boto3.client("iam")
    [role] = iam.get_instance_profile(InstanceProfileName=store.instance_profile_name)["InstanceProfile"]["Roles"]
    assert role["RoleName"] == store.role_name
    encryption = boto3.client("s3", region_name=REGION).get_bucket_encryption(Bucket=store.bucket)
    assert encryption["ServerSideEncryptionConfiguration"]["Rules"][0]["ApplyServerSideEncryptionByDefault"]
    assert stack.find_store(REGION, provisioner_factory=provisioners) == store
    assert api_calls.count("ExecuteChangeSet") == 1

    again = stack.setup(REGION, provisioner_factory=provisioners)
    assert again.outcome is stack.SetupOutcome.UNCHANGED and again.store == store
    assert api_calls.count("ExecuteChangeSet") == 1  # nothing executed the second time
    assert api_calls.count("CreateChangeSet") == 2 and api_calls.count("DeleteChangeSet") >= 1  # no stale change set

    updated = stack.setup(REGION, retention_days=7, provisioner_factory=provisioners)
    assert updated.outcome is stack.SetupOutcome.UPDATED and updated.store == store
    assert api_calls.count("ExecuteChangeSet") == 2
    [params] = [p for p, name in zip(api_calls.params, api_calls.calls) if name == "CreateChangeSet"][-1:]
    assert params["Parameters"] == [{"ParameterKey": "RetentionDays", "ParameterValue": "7"}]
    assert params["Capabilities"] == ["CAPABILITY_NAMED_IAM"]
    assert json.loads(params["TemplateBody"])["Resources"].keys() == {
        "RunsBucket", "RunsBucketPolicy", "InstanceRole", "InstanceProfile"}


def test_dry_run_shows_the_plan_and_changes_nothing(cloud, provisioners, api_calls, gpuflow_home):
    shown = []
    planned = stack.setup(REGION, dry_run=True, provisioner_factory=provisioners, show_plan=shown.append)
    assert planned.outcome is stack.SetupOutcome.PLANNED and len(planned.changes) == 4
    assert shown and shown[0].kind == "CREATE"
    assert _stacks() == [] and not any(name.startswith("gpuflow-runs-") for name in _buckets())
    assert api_calls.count("ExecuteChangeSet") == 0
    assert stack.find_store(REGION, provisioner_factory=provisioners) is None

    stack.setup(REGION, provisioner_factory=provisioners)
    stack.setup(REGION, retention_days=9, dry_run=True, provisioner_factory=provisioners)
    assert api_calls.count("ExecuteChangeSet") == 1  # the dry run of an update executed nothing either
    cfn = boto3.client("cloudformation", region_name=REGION)
    pending = [item for item in cfn.list_change_sets(StackName=STACK_NAME)["Summaries"]
               if item.get("ExecutionStatus") != "EXECUTE_COMPLETE"]  # moto keeps executed ones listed
    assert pending == []


def test_retention_days_out_of_range_is_refused_before_any_call(cloud, provisioners, api_calls, gpuflow_home):
    for days in (0, -1, 3651):
        with pytest.raises(UsageError, match="--retention-days"):
            stack.setup(REGION, retention_days=days, provisioner_factory=provisioners)
    assert api_calls.calls == []


def test_delete_refuses_while_the_bucket_holds_runs_and_force_empties_it(cloud, provisioners, api_calls, gpuflow_home):
    store = stack.setup(REGION, provisioner_factory=provisioners).store
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=store.bucket, Key="runs/owner/run-1/log/job.log", Body=b"epoch 1\n")
    s3.put_object(Bucket=store.bucket, Key="notes.txt", Body=b"not a run")
    with pytest.raises(UsageError, match=r"holds 1 object\(s\) of runs.*not deleted") as refused:
        stack.delete(REGION, provisioner_factory=provisioners)
    assert "--force" in (refused.value.hint or "")
    assert stack.find_store(REGION, provisioner_factory=provisioners) == store  # untouched
    assert len(s3.list_objects_v2(Bucket=store.bucket)["Contents"]) == 2

    deleted = stack.delete(REGION, force=True, provisioner_factory=provisioners)
    assert deleted.outcome is stack.SetupOutcome.DELETED and deleted.objects_deleted == 2
    assert _stacks() == [] and store.bucket not in _buckets() and store.role_name not in _roles()
    assert stack.delete(REGION, provisioner_factory=provisioners).outcome is stack.SetupOutcome.ABSENT


def test_delete_of_an_empty_bucket_needs_no_force(cloud, provisioners, api_calls, gpuflow_home):
    store = stack.setup(REGION, provisioner_factory=provisioners).store
    assert stack.delete(REGION, provisioner_factory=provisioners).outcome is stack.SetupOutcome.DELETED
    assert store.bucket not in _buckets()


@pytest.mark.parametrize("operation", ["CreateChangeSet", "DescribeChangeSet", "ExecuteChangeSet"])
def test_a_failed_change_set_leaves_no_half_stack(cloud, provisioners, api_calls, gpuflow_home, operation):
    api_calls.fail(operation, code="ValidationError" if operation != "DescribeChangeSet" else "InternalFailure",
                   times=None if operation == "DescribeChangeSet" else 1)
    with pytest.raises(CloudError) as failed:
        stack.setup(REGION, provisioner_factory=provisioners)
    assert "\n" not in str(failed.value) and operation.lower().replace("changeset", "_change_set") in str(failed.value)
    assert _stacks() == [] and not any(name.startswith("gpuflow-runs-") for name in _buckets())
    api_calls.faults.clear()
    assert stack.setup(REGION, provisioner_factory=provisioners).outcome is stack.SetupOutcome.CREATED  # retry works


def test_a_create_that_fails_in_cloudformation_is_deleted(cloud, provisioners, api_calls, gpuflow_home, monkeypatch):
    """The change set executes but the stack ends in ROLLBACK_COMPLETE (as AWS does when a
    resource cannot be made): the stack is deleted and the error says so in one line."""
    from infra.aws import stack as aws_stack

    real = aws_stack.AccountStacks.describe_account_stack
    state = {"executed": False}

    def describe(self, stack_name=STACK_NAME):
        view = real(self, stack_name)
        if state["executed"] and view is not None and view.status == "CREATE_COMPLETE":
            from dataclasses import replace
            return replace(view, status="ROLLBACK_COMPLETE", usable=False, bucket=None)
        return view

    api_calls.fail("ExecuteChangeSet", when=lambda params: state.update(executed=True) or False)
    monkeypatch.setattr(aws_stack.AccountStacks, "describe_account_stack", describe)
    with pytest.raises(CloudError, match="creating the account stack failed.*nothing was left behind"):
        stack.setup(REGION, provisioner_factory=provisioners)
    monkeypatch.setattr(aws_stack.AccountStacks, "describe_account_stack", real)
    assert _stacks() == [] and api_calls.count("DeleteStack") == 1


def test_up_attaches_the_instance_profile_when_the_stack_exists(cloud, provisioners, api_calls, gpuflow_home):
    warnings: list[str] = []
    plain = clusters.up(make_spec("plain"), provisioner_factory=provisioners, warn=warnings.append)
    assert plain.instance_profile_arn is None
    spot_warnings: list[str] = []
    clusters.up(make_spec("spotty", spot=True), provisioner_factory=provisioners, warn=spot_warnings.append)
    assert [line for line in spot_warnings if "gpuflow setup" in line] == [stack.durable_hint(False)]
    assert not [line for line in warnings if "gpuflow setup" in line]  # on-demand: no hint

    store = stack.setup(REGION, provisioner_factory=provisioners).store
    with_store: list[str] = []
    durable = clusters.up(make_spec("durable", spot=True), provisioner_factory=provisioners, warn=with_store.append)
    assert durable.instance_profile_arn == store.instance_profile_arn and durable.durable_bucket == store.bucket
    assert not [line for line in with_store if "gpuflow setup" in line]
    [run] = [p for p, name in zip(api_calls.params, api_calls.calls) if name == "RunInstances"][-1:]
    assert run["IamInstanceProfile"] == {"Arn": store.instance_profile_arn}
    [instance] = cloud.describe_instances(InstanceIds=[durable.head.instance_id])["Reservations"][0]["Instances"]
    assert instance["IamInstanceProfile"]["Arn"] == store.instance_profile_arn
    record = json.loads((gpuflow_home / "state" / "clusters" / "durable.json").read_text())
    assert json.dumps(record).count(store.instance_profile_arn) >= 1
    runs_without = [p for p, name in zip(api_calls.params, api_calls.calls) if name == "RunInstances"][:2]
    assert all("IamInstanceProfile" not in params for params in runs_without)
    for name in ("plain", "spotty", "durable"):
        clusters.down(name, provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}
    made = set(api_calls.gpuflow_calls)
    for expected in ("DescribeStacks", "CreateChangeSet", "DescribeChangeSet", "ExecuteChangeSet"):
        assert ("cloudformation", expected) in made
    stack.delete(REGION, force=True, provisioner_factory=provisioners)
    assert ("cloudformation", "DeleteStack") in set(api_calls.gpuflow_calls)
    assert ("s3", "ListObjectsV2") in set(api_calls.gpuflow_calls)


def test_ctrl_c_while_the_plan_is_shown_leaves_no_stack_or_change_set(cloud, provisioners, api_calls, gpuflow_home):
    def interrupt(plan):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stack.setup(REGION, provisioner_factory=provisioners, show_plan=interrupt)
    assert _stacks() == [] and api_calls.count("ExecuteChangeSet") == 0


def test_up_without_the_right_to_read_stacks_warns_once_and_launches_without_a_role(
        cloud, provisioners, api_calls, gpuflow_home):
    api_calls.fail("DescribeStacks", code="AccessDenied")
    warnings: list[str] = []
    cluster = clusters.up(make_spec("norights"), provisioner_factory=provisioners, warn=warnings.append)
    assert cluster.instance_profile_arn is None
    assert len([line for line in warnings if line.startswith("could not read the account stack")]) == 1
    [run] = [p for p, name in zip(api_calls.params, api_calls.calls) if name == "RunInstances"]
    assert "IamInstanceProfile" not in run
    clusters.down("norights", provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}


def test_up_right_after_setup_waits_for_the_new_profile_to_be_visible(cloud, provisioners, api_calls, gpuflow_home):
    """IAM is eventually consistent: EC2 may refuse a just-made instance profile for some seconds."""
    import botocore.exceptions

    store = stack.setup(REGION, provisioner_factory=provisioners).store
    not_yet = botocore.exceptions.ClientError({"Error": {"Code": "InvalidParameterValue", "Message": (
        f"Value ({store.instance_profile_arn}) for parameter iamInstanceProfile.arn is invalid. "
        "Invalid IAM Instance Profile ARN")}}, "RunInstances")
    api_calls.fail("RunInstances", times=2, exception=not_yet)
    cluster = clusters.up(make_spec("fresh"), provisioner_factory=provisioners)
    assert cluster.instance_profile_arn == store.instance_profile_arn and api_calls.count("RunInstances") == 3
    assert provisioners.sleeps[-2:] == [2.0, 4.0]
    tokens = [p["ClientToken"] for p, name in zip(api_calls.params, api_calls.calls) if name == "RunInstances"]
    assert len(set(tokens)) == 3  # each retry is its own request
    clusters.down("fresh", provisioner_factory=provisioners)

    api_calls.faults.clear()
    api_calls.fail("RunInstances", exception=not_yet)  # never visible: a bounded wait, then the one-line error
    with pytest.raises(CloudError, match="Invalid IAM Instance Profile"):
        clusters.up(make_spec("never"), provisioner_factory=provisioners)
    assert leftovers(cloud, gpuflow_home) == {}
