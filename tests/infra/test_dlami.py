"""infra/dlami.py: the newest TensorFlow DLAMI that exists (highest version
parameter, else the name search, else the base DLAMI under either spelling), a
pinned version, and failures — against moto's SSM and EC2, through the real
AwsApi call path.  moto refuses put_parameter under /aws/, so the public
parameters are written into its SSM backend as AWS would publish them."""

from __future__ import annotations

import datetime

import pytest

from infra.dlami import (
    DLAMI_BASE_SSM_PARAMETERS,
    DLAMI_OWNER_ALIAS,
    DLAMI_OWNER_ID,
    DLAMI_PARAMETER_PATH,
    DlamiChoice,
    no_dlami_message,
    resolve_dlami,
    tensorflow_dlami_parameter,
)

REGION = "eu-west-1"


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    from moto import mock_aws

    from infra.aws.client import AwsApi, AwsTarget

    with mock_aws():
        api = AwsApi(AwsTarget(REGION))
        calls: list[tuple[str, dict]] = []

        def call(service, operation, **params):
            calls.append((operation, params))
            return api.call(service, operation, **params)

        call.calls = calls  # type: ignore[attr-defined]
        yield call


def _publish(name: str, value: str) -> None:
    """A public parameter, as AWS publishes it (moto's backend, written directly)."""
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ssm.models import Parameter

    versions = get_backend("ssm")[DEFAULT_ACCOUNT_ID][REGION]._parameters[name]
    versions.append(Parameter(
        account_id=DEFAULT_ACCOUNT_ID, name=name, value=value, parameter_type="String", description=None,
        allowed_pattern=None, keyid=None, last_modified_date=datetime.datetime.now(datetime.timezone.utc),
        version=len(versions) + 1, data_type="aws:ec2:image",
    ))


def _image(name: str, created: str) -> str:
    """An Amazon-owned image of that name (moto's backend: register_image cannot set the owner)."""
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models.amis import Ami
    from moto.ec2.utils import random_ami_id

    backend = get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION]
    image = Ami(backend, random_ami_id(), name=name, owner_id=DLAMI_OWNER_ID, owner_alias=DLAMI_OWNER_ALIAS,
                public=True, virtualization_type="hvm", architecture="x86_64", root_device_type="ebs",
                root_device_name="/dev/sda1", creation_date=datetime.datetime.fromisoformat(created),
                region_name=REGION)
    backend.amis[image.id] = image
    return image.id


def _tf_name(version: str, date: str = "20250101") -> str:
    return f"Deep Learning OSS Nvidia Driver AMI GPU TensorFlow {version} (Ubuntu 22.04) {date}"


def test_the_highest_tensorflow_version_wins_numerically_across_pages(aws):
    # Other DLAMIs under the same path first (more than one page of 10), and a TF DLAMI for another OS.
    for index in range(14):
        _publish(f"{DLAMI_PARAMETER_PATH}/oss-nvidia-driver-gpu-pytorch-2.{index}-ubuntu-22.04/latest/ami-id",
                 f"ami-1{index:016d}")
    for version, ami in (("2.9", "ami-00000000000000009"), ("2.16", "ami-00000000000000016"),
                         ("2.18", "ami-00000000000000018"), ("2.17", "ami-00000000000000017")):
        _publish(tensorflow_dlami_parameter(version), ami)
    _publish(f"{DLAMI_PARAMETER_PATH}/oss-nvidia-driver-gpu-tensorflow-2.99-amazon-linux-2/latest/ami-id",
             "ami-0000000000000wrong")
    _publish(DLAMI_BASE_SSM_PARAMETERS[0], "ami-000000000000base0")

    choice = resolve_dlami(aws)

    assert choice == DlamiChoice("ami-00000000000000018", "ssm", tensorflow_dlami_parameter("2.18"), "2.18")
    assert "TensorFlow 2.18 DLAMI ami-00000000000000018" in choice.describe()
    pages = [params for operation, params in aws.calls if operation == "get_parameters_by_path"]
    assert len(pages) >= 2 and "NextToken" in pages[1]  # it paged through the listing
    assert all(page["Path"] == DLAMI_PARAMETER_PATH and page["Recursive"] for page in pages)


def test_a_pinned_version_takes_that_parameter_and_never_another(aws):
    _publish(tensorflow_dlami_parameter("2.18"), "ami-00000000000000018")
    _publish(tensorflow_dlami_parameter("2.16"), "ami-00000000000000016")
    _publish(DLAMI_BASE_SSM_PARAMETERS[0], "ami-000000000000base0")

    assert resolve_dlami(aws, tensorflow_version="2.16") == DlamiChoice(
        "ami-00000000000000016", "ssm", tensorflow_dlami_parameter("2.16"), "2.16")
    assert resolve_dlami(aws, tensorflow_version="2.17") is None  # not published: no silent fallback
    image_id = _image(_tf_name("2.17"), "2024-01-01T00:00:00+00:00")
    _image(_tf_name("2.18"), "2025-06-01T00:00:00+00:00")
    choice = resolve_dlami(aws, tensorflow_version="2.17")  # the parameter is missing, the image exists
    assert (choice.image_id, choice.source, choice.tensorflow_version) == (image_id, "name-search", "2.17")
    with pytest.raises(ValueError):
        resolve_dlami(aws, tensorflow_version="latest")
    message, hint = no_dlami_message(REGION, "2.17")
    assert message == "no TensorFlow 2.17 Deep Learning AMI in eu-west-1" and "tensorflow_dlami" in hint


def test_without_parameters_the_highest_version_by_name_wins(aws):
    _image(_tf_name("2.9", "20260101"), "2026-01-01T00:00:00+00:00")  # newer date, older TensorFlow
    newest = _image(_tf_name("2.18", "20250101"), "2025-01-01T00:00:00+00:00")
    _image(_tf_name("2.18", "20241101"), "2024-11-01T00:00:00+00:00")  # the same version, an older build
    _image("Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.5 (Ubuntu 22.04) 20260101", "2026-02-01T00:00:00+00:00")
    _publish(DLAMI_BASE_SSM_PARAMETERS[0], "ami-000000000000base0")

    choice = resolve_dlami(aws)

    assert choice == DlamiChoice(newest, "name-search", None, "2.18", _tf_name("2.18", "20250101"))


@pytest.mark.parametrize("published", DLAMI_BASE_SSM_PARAMETERS)
def test_the_base_dlami_under_either_spelling(aws, published):
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in DLAMI_BASE_SSM_PARAMETERS[0]
    assert "base-oss-nvidia-driver-ubuntu-22.04" in DLAMI_BASE_SSM_PARAMETERS[1]
    _publish(published, "ami-000000000000base0")
    assert resolve_dlami(aws) == DlamiChoice("ami-000000000000base0", "ssm", published, None)


def test_nothing_anywhere_is_none_and_says_pass_ami(aws):
    assert resolve_dlami(aws) is None
    message, hint = no_dlami_message(REGION)
    assert message == "no AWS Deep Learning AMI found in eu-west-1" and "--ami" in hint


def test_a_refused_listing_is_an_error_not_a_fallback(aws):
    """Only "parameter not found" means absent: AccessDenied on the listing
    (a policy without ssm:GetParametersByPath) propagates as the API's error."""
    from infra.aws.client import AwsCallError

    _publish(DLAMI_BASE_SSM_PARAMETERS[0], "ami-000000000000base0")

    def refusing(service, operation, **params):
        if operation == "get_parameters_by_path":
            raise AwsCallError("ssm GetParametersByPath refused: AccessDeniedException", code="AccessDeniedException",
                               operation="GetParametersByPath")
        return aws(service, operation, **params)

    with pytest.raises(AwsCallError, match="AccessDenied"):
        resolve_dlami(refusing)

    def failing_parameter(service, operation, **params):
        if operation == "get_parameter":
            raise AwsCallError("ssm GetParameter failed: InternalError", code="InternalError", operation="GetParameter")
        return aws(service, operation, **params)

    with pytest.raises(AwsCallError, match="InternalError"):
        resolve_dlami(failing_parameter)  # no TF DLAMI: asks for the base parameter, which fails


def test_the_sandbox_seeds_what_the_resolver_finds(aws):
    from infra.sandbox import seed_deep_learning_ami

    seeded = seed_deep_learning_ami(REGION)
    choice = resolve_dlami(aws)
    assert (choice.image_id, choice.tensorflow_version) == (seeded, "2.18")


def test_the_cluster_record_carries_the_chosen_dlami_and_reads_old_records():
    from gpuflow.records import Cluster

    cluster = Cluster(name="c", region=REGION, instance_type="g5.xlarge", ami="ami-00000000000000018",
                      ami_name=_tf_name("2.18"), ami_parameter=tensorflow_dlami_parameter("2.18"))
    document = cluster.to_dict()
    assert document["ami_parameter"].endswith("/oss-nvidia-driver-gpu-tensorflow-2.18-ubuntu-22.04/latest/ami-id")
    assert Cluster.from_dict(document) == cluster
    del document["ami_name"], document["ami_parameter"]  # a record written before these fields
    assert (Cluster.from_dict(document).ami_name, Cluster.from_dict(document).ami_parameter) == (None, None)
