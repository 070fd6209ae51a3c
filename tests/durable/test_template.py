"""infra/account-stack.json says what README promises (moto does not model every property: checked here)."""

from __future__ import annotations

from infra.account_stack import DEFAULT_RETENTION_DAYS, template


def test_the_bucket_is_encrypted_private_tls_only_and_expires_runs():
    resources = template()["Resources"]
    bucket = resources["RunsBucket"]["Properties"]
    [rule] = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    [lifecycle] = bucket["LifecycleConfiguration"]["Rules"]
    assert lifecycle["Status"] == "Enabled" and lifecycle["Prefix"] == "runs/"
    assert lifecycle["ExpirationInDays"] == {"Ref": "RetentionDays"}
    assert template()["Parameters"]["RetentionDays"]["Default"] == DEFAULT_RETENTION_DAYS == 30
    policy = resources["RunsBucketPolicy"]["Properties"]
    assert policy["Bucket"] == {"Ref": "RunsBucket"}
    [deny] = policy["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Principal"] == "*" and deny["Action"] == "s3:*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert len(deny["Resource"]) == 2  # the bucket and its objects


def test_the_role_is_for_ec2_only_with_one_inline_policy_and_nothing_attached():
    resources = template()["Resources"]
    role = resources["InstanceRole"]["Properties"]
    [trust] = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust == {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    assert "ManagedPolicyArns" not in role and "PermissionsBoundary" not in role
    assert len(role["Policies"]) == 1
    assert resources["InstanceProfile"]["Properties"]["Roles"] == [{"Ref": "InstanceRole"}]
    # nothing else in the stack grants anything
    assert {item["Type"] for item in resources.values()} == {
        "AWS::S3::Bucket", "AWS::S3::BucketPolicy", "AWS::IAM::Role", "AWS::IAM::InstanceProfile"}
    assert set(template()["Outputs"]) == {"BucketName", "RoleName", "InstanceProfileName", "InstanceProfileArn"}
