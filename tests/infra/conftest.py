"""The moto cloud fixtures (defined in tests/infra/cloud.py with the helpers they use; tests/clusters shares them)."""

from tests.infra.cloud import api_calls, cloud, provisioners  # noqa: F401 - fixtures
