"""The moto cloud fixtures (tests/infra/cloud.py) for the durable-runs tests."""

from tests.infra.cloud import api_calls, cloud, provisioners  # noqa: F401 - fixtures
