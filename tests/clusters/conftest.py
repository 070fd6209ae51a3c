"""The cluster tests' fixtures: a moto cloud in this process and fast provisioners (tests/infra/cloud.py)."""

from tests.infra.cloud import api_calls, cloud, provisioners  # noqa: F401 - fixtures
