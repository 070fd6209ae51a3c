"""The instances' role reaches objects under runs/ of its bucket and nothing else.

Two checks: moto's IAM enforcement, with the role's temporary credentials (what an
instance holds), against real calls; and a small evaluator of the policy document
for what moto does not enforce (S3 condition keys: the ListBucket prefix)."""

from __future__ import annotations

import ast
import fnmatch
import json
from typing import Any

import boto3
import botocore.exceptions
import pytest

from gpuflow.durable import stack
from infra.account_stack import instance_role_policy
from tests.infra.cloud import REGION

BUCKET = "gpuflow-runs-123456789012-us-east-1"


def _resolved_policy(bucket: str) -> dict[str, Any]:
    text = json.dumps(instance_role_policy())
    text = text.replace("${AWS::Partition}", "aws").replace("${RunsBucket}", bucket)
    document = json.loads(text)
    for statement in document["Statement"]:  # {"Fn::Sub": "..."} -> "..."
        resource = statement["Resource"]
        statement["Resource"] = resource["Fn::Sub"] if isinstance(resource, dict) else resource
    return document


def _listify(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def allowed(document: dict[str, Any], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """IAM's answer for an identity policy with Allow statements only (implicit deny otherwise);
    conditions: StringLike / StringEquals over the request's context keys (a missing key fails)."""
    context = context or {}
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        if not any(fnmatch.fnmatchcase(action.lower(), pattern.lower()) for pattern in _listify(statement["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in _listify(statement["Resource"])):
            continue
        conditions = statement.get("Condition", {})
        for operator, keys in conditions.items():
            assert operator in ("StringLike", "StringEquals"), operator
            for key, expected in keys.items():
                value = context.get(key)
                match = fnmatch.fnmatchcase if operator == "StringLike" else (lambda v, p: v == p)
                if value is None or not any(match(value, pattern) for pattern in _listify(expected)):
                    break
            else:
                continue
            break
        else:
            return True
    return False


def test_the_policy_allows_exactly_runs_objects_and_listing_runs():
    document = _resolved_policy(BUCKET)
    objects = f"arn:aws:s3:::{BUCKET}/runs/owner/run/checkpoints/000001/weights.h5"
    for action in ("s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"):
        assert allowed(document, action, objects)
    assert allowed(document, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {"s3:prefix": "runs/owner/run/"})
    refused = [
        ("s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {}),  # the whole bucket
        ("s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {"s3:prefix": ""}),
        ("s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {"s3:prefix": "secrets/"}),
        ("s3:ListBucket", "arn:aws:s3:::someone-elses-bucket", {"s3:prefix": "runs/"}),
        ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/notes.txt", {}),
        ("s3:PutObject", f"arn:aws:s3:::{BUCKET}/elsewhere/runs/x", {}),
        ("s3:GetObject", "arn:aws:s3:::someone-elses-bucket/runs/x", {}),
        ("s3:PutObject", f"arn:aws:s3:::{BUCKET}-copy/runs/x", {}),
        ("s3:DeleteObject", objects, {}),
        ("s3:DeleteBucket", f"arn:aws:s3:::{BUCKET}", {}),
        ("s3:PutBucketPolicy", f"arn:aws:s3:::{BUCKET}", {}),
        ("s3:PutLifecycleConfiguration", f"arn:aws:s3:::{BUCKET}", {}),
        ("s3:ListAllMyBuckets", "*", {}),
        ("s3:CreateBucket", "arn:aws:s3:::new", {}),
        ("ec2:RunInstances", "*", {}),
        ("ec2:DescribeInstances", "*", {}),
        ("iam:PassRole", "*", {}),
        ("iam:CreateUser", "*", {}),
        ("sts:AssumeRole", "*", {}),
        ("kms:Decrypt", "*", {}),
        ("ssm:GetParameter", "*", {}),
    ]
    for action, resource, context in refused:
        assert not allowed(document, action, resource, context), (action, resource, context)


def test_the_evaluator_can_say_yes_and_no():
    """The evaluator is not vacuous: a wide policy allows what ours refuses."""
    wide = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    assert allowed(wide, "s3:DeleteBucket", f"arn:aws:s3:::{BUCKET}")
    assert not allowed(_resolved_policy(BUCKET), "s3:DeleteBucket", f"arn:aws:s3:::{BUCKET}")


@pytest.fixture
def role_session(cloud, provisioners, gpuflow_home):
    """The deployed stack, and a boto3 session holding the role's temporary credentials."""
    store = stack.setup(REGION, provisioner_factory=provisioners).store
    iam = boto3.client("iam")
    # moto keeps a CloudFormation role's inline policy as a dict that its own IAM enforcement
    # cannot read (GetRolePolicy answers its Python repr): put the same document back as JSON.
    [name] = iam.list_role_policies(RoleName=store.role_name)["PolicyNames"]
    document = iam.get_role_policy(RoleName=store.role_name, PolicyName=name)["PolicyDocument"]
    document = ast.literal_eval(document) if isinstance(document, str) else document
    assert document == _resolved_policy(store.bucket)  # what CloudFormation made is the template's policy
    iam.put_role_policy(RoleName=store.role_name, PolicyName=name, PolicyDocument=json.dumps(document))
    role_arn = iam.get_role(RoleName=store.role_name)["Role"]["Arn"]
    credentials = boto3.client("sts", region_name=REGION).assume_role(
        RoleArn=role_arn, RoleSessionName="gpuflow-instance")["Credentials"]
    session = boto3.session.Session(
        aws_access_key_id=credentials["AccessKeyId"], aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"], region_name=REGION)
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="someone-elses-bucket")
    s3.put_object(Bucket=store.bucket, Key="runs/o/r/log/job.log", Body=b"1")
    s3.put_object(Bucket=store.bucket, Key="notes.txt", Body=b"2")
    return store, session


def test_the_role_credentials_reach_runs_and_nothing_else(role_session):
    from moto.core.authorization import enable_iam_authentication

    store, session = role_session
    s3, ec2, iam, sts = (session.client(name, region_name=REGION) for name in ("s3", "ec2", "iam", "sts"))
    bucket = store.bucket
    with enable_iam_authentication():
        assert s3.get_object(Bucket=bucket, Key="runs/o/r/log/job.log")["Body"].read() == b"1"
        s3.put_object(Bucket=bucket, Key="runs/o/r/checkpoints/000001/COMMIT.json", Body=b"{}")
        s3.list_objects_v2(Bucket=bucket, Prefix="runs/o/")
        refused = {
            "get outside runs/": lambda: s3.get_object(Bucket=bucket, Key="notes.txt"),
            "put outside runs/": lambda: s3.put_object(Bucket=bucket, Key="notes2.txt", Body=b"x"),
            "delete a run's object": lambda: s3.delete_object(Bucket=bucket, Key="runs/o/r/log/job.log"),
            "another bucket": lambda: s3.put_object(Bucket="someone-elses-bucket", Key="runs/x", Body=b"x"),
            "delete the bucket": lambda: s3.delete_bucket(Bucket=bucket),
            "change the bucket policy": lambda: s3.put_bucket_policy(Bucket=bucket, Policy="{}"),
            "create a bucket": lambda: s3.create_bucket(Bucket="gpuflow-runs-new"),
            "list buckets": lambda: s3.list_buckets(),
            "ec2": lambda: ec2.describe_instances(),
            "ec2 launch": lambda: ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1),
            "iam": lambda: iam.list_roles(),
            "iam escalate": lambda: iam.put_role_policy(RoleName=store.role_name, PolicyName="x", PolicyDocument="{}"),
            "sts assume another role": lambda: sts.assume_role(
                RoleArn=f"arn:aws:iam::123456789012:role/{store.role_name}", RoleSessionName="again"),
        }
        let_through = []
        for what, call in refused.items():
            try:
                call()
            except botocore.exceptions.ClientError as exc:
                assert exc.response["Error"]["Code"] in ("AccessDenied", "AccessDeniedException"), (what, exc)
            else:
                let_through.append(what)
        assert let_through == []
