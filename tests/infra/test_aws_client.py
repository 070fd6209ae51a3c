"""The AWS access layer: back-off, error mapping, endpoints, prices, caller IP."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import botocore.exceptions
import pytest

from gpuflow.errors import CapacityError, CloudError, CredentialsError
from gpuflow.provisioner import open_provisioner
from infra.aws import caller_ip
from infra.aws.client import (
    RetryPolicy,
    in_process_mock_active,
    known_regions,
    map_botocore_error,
    map_client_error,
)
from infra.aws.pricing import PRICES_PATH, load_price_table


def _client_error(code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"}}, "RunInstances")


def test_backoff_is_capped_exponential_with_full_jitter():
    policy = RetryPolicy(attempts=6, base_delay=0.5, max_delay=20.0)
    assert [policy.delay(attempt, lambda: 1.0) for attempt in range(8)] == [0.5, 1, 2, 4, 8, 16, 20, 20]
    assert policy.delay(3, lambda: 0.0) == 0.0


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("InsufficientInstanceCapacity", CapacityError),
        ("SpotMaxPriceTooLow", CapacityError),
        ("AuthFailure", CredentialsError),
        ("UnauthorizedOperation", CredentialsError),
        ("InvalidParameterValue", CloudError),
    ],
)
def test_client_errors_map_to_gpuflow_errors(code, kind):
    error = map_client_error(_client_error(code), "RunInstances")
    assert isinstance(error, kind)
    assert error.code == code
    assert code in error.one_line() and "\n" not in error.one_line()


def test_unauthorized_points_at_the_policy():
    assert "infra/iam-policy.json" in map_client_error(_client_error("UnauthorizedOperation"), "RunInstances").one_line()


def test_missing_credentials_map_to_credentials_error():
    for exc in (botocore.exceptions.NoCredentialsError(), botocore.exceptions.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY")):
        error = map_botocore_error(exc, "DescribeInstances")
        assert isinstance(error, CredentialsError) and error.exit_code == 3


def test_regions_come_from_botocore_without_network():
    regions = known_regions()
    assert {"us-east-1", "eu-west-1", "ap-southeast-2"} <= regions
    assert "mars-east-9" not in regions


def test_in_process_mock_detection_goes_by_gpuflows_own_mock():
    """gpuflow's in-process mock is recorded by gpuflow itself (nested too), not read
    from moto's private counters; a bare mock_aws() someone else entered does not count."""
    from moto import mock_aws

    from infra.aws.client import in_process_mock

    assert not in_process_mock_active()
    with in_process_mock():
        assert in_process_mock_active()
        with in_process_mock():
            assert in_process_mock_active()
        assert in_process_mock_active()
    assert not in_process_mock_active()
    with mock_aws():
        assert not in_process_mock_active()


def test_infra_reads_no_private_moto_state():
    """Production code goes by moto's public API only (issue 9)."""
    sources = [path.read_text() for path in (Path(__file__).resolve().parents[2] / "infra").rglob("*.py")]
    assert not [text for text in sources if "_nested_count" in text or "_mocks_active" in text]


def test_sandbox_clients_use_the_sandbox_endpoint_and_fake_credentials(monkeypatch, gpuflow_home):
    import infra.sandbox

    asked = []
    monkeypatch.setattr(infra.sandbox, "sandbox_endpoint", lambda home, **_options: asked.append(home) or "http://127.0.0.1:1", raising=False)
    provisioner = open_provisioner("us-east-1", sandbox=True, profile="ignored-in-sandbox")
    client = provisioner.api.client("ec2")
    assert client.meta.endpoint_url == "http://127.0.0.1:1"
    assert asked == [gpuflow_home]
    credentials = client._request_signer._credentials
    assert credentials.access_key == "gpuflow-sandbox"  # never the user's real keys


def test_real_clients_have_no_endpoint_override():
    client = open_provisioner("eu-west-1").api.client("ec2")
    assert client.meta.endpoint_url == "https://ec2.eu-west-1.amazonaws.com"
    assert client.meta.config.retries["mode"] == "standard"


def test_price_table_is_dated_and_covers_the_common_gpu_types():
    table = load_price_table()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", table.as_of)
    assert table.region == "us-east-1"
    for family in ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p5"):
        sizes = [name for name in table.on_demand if name.split(".")[0] == family]
        assert sizes, family
    assert all(price > 0 for price in table.on_demand.values())
    assert table.on_demand_price("g5.xlarge") < table.on_demand_price("g5.2xlarge") < table.on_demand_price("p5.48xlarge")
    assert json.loads(PRICES_PATH.read_text())["currency"] == "USD"


def test_caller_ip_detection_parses_the_answer(monkeypatch):
    import urllib.request

    seen = []

    def fake_urlopen(url, timeout):
        seen.append((url, timeout))
        return io.BytesIO(b"198.51.100.7\n")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert caller_ip.detect_caller_ip() == "198.51.100.7"
    assert seen == [("https://checkip.amazonaws.com", 5.0)]
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"<html>captive portal</html>"))
    with pytest.raises(CloudError, match="not an IP address"):
        caller_ip.detect_caller_ip()


def test_caller_ip_detection_offline_is_one_line(monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # never a real lookup, not even DNS
    with pytest.raises(CloudError) as error:
        caller_ip.detect_caller_ip(timeout_seconds=1)
    assert "--ssh-cidr" in error.value.one_line() and "\n" not in error.value.one_line()


def test_cluster_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom gpuflow.cli import main\n"
        "for argv in (['up', '--help'], ['reap', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('boto3', 'botocore', 'moto', 'gpuflow.clusters', 'rich.progress') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in output
