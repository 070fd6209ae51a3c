"""GetConsoleOutput asks for the latest output (Latest=True, Nitro types) and falls back
to the default buffer where the API refuses that (issue 10, item 19)."""

from __future__ import annotations

import pytest

from gpuflow.errors import CloudError, CredentialsError
from gpuflow.provisioner import open_provisioner
from tests.infra.cloud import REGION

MOTO_SAMPLE = "Linux version 2.6.16-xenU"  # the start of the console text moto returns for every instance


def _instance(cloud) -> str:
    image = cloud.describe_images(Owners=["898082745236"])["Images"][0]["ImageId"]
    return cloud.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="g5.xlarge")["Instances"][0]["InstanceId"]


def _console_calls(api_calls) -> list[dict]:
    return [params for name, params in zip(api_calls.calls, api_calls.params) if name == "GetConsoleOutput"]


def test_the_latest_output_is_asked_for_first(cloud, api_calls, gpuflow_home):
    instance_id = _instance(cloud)
    text = open_provisioner(REGION).console_output(instance_id)
    assert text.startswith(MOTO_SAMPLE)  # decoded, through moto's path
    assert _console_calls(api_calls) == [{"InstanceId": instance_id, "Latest": True}]


@pytest.mark.parametrize("code", ["UnsupportedOperation", "InvalidParameterValue", "InvalidParameterCombination"])
def test_an_instance_type_without_latest_output_gets_the_default_buffer(cloud, api_calls, gpuflow_home, code):
    instance_id = _instance(cloud)
    api_calls.fail("GetConsoleOutput", code=code, when=lambda params: params.get("Latest") is True)
    provisioner = open_provisioner(REGION)
    assert provisioner.console_output(instance_id).startswith(MOTO_SAMPLE)
    assert _console_calls(api_calls) == [{"InstanceId": instance_id, "Latest": True}, {"InstanceId": instance_id}]
    # The refusal is remembered for the instance: the host-key poll does not ask twice each time.
    assert provisioner.console_output(instance_id).startswith(MOTO_SAMPLE)
    assert _console_calls(api_calls)[2:] == [{"InstanceId": instance_id}]


def test_other_refusals_are_not_taken_for_a_missing_latest_option(cloud, api_calls, gpuflow_home):
    instance_id = _instance(cloud)
    provisioner = open_provisioner(REGION)
    api_calls.fail("GetConsoleOutput", code="UnauthorizedOperation", times=1)
    with pytest.raises(CredentialsError, match="UnauthorizedOperation"):
        provisioner.console_output(instance_id)
    api_calls.fail("GetConsoleOutput", code="SomethingElse", times=1)
    with pytest.raises(CloudError, match="SomethingElse"):
        provisioner.console_output(instance_id)
    assert len(_console_calls(api_calls)) == 2  # no fallback call after either
    api_calls.fail("GetConsoleOutput", code="InvalidInstanceID.NotFound", times=1)
    assert provisioner.console_output(instance_id) == ""  # gone: no console, as before


def test_a_refused_fallback_call_is_an_error(cloud, api_calls, gpuflow_home):
    instance_id = _instance(cloud)
    api_calls.fail("GetConsoleOutput", code="UnsupportedOperation", when=lambda params: params.get("Latest") is True)
    api_calls.fail("GetConsoleOutput", code="SomethingElse", when=lambda params: "Latest" not in params)
    with pytest.raises(CloudError, match="SomethingElse"):
        open_provisioner(REGION).console_output(instance_id)
