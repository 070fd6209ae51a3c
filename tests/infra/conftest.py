"""The cluster tests' fixtures (defined in tests/infra/cloud.py with the helpers they use)."""

from tests.infra.cloud import api_calls, cloud, provisioners  # noqa: F401 - fixtures
