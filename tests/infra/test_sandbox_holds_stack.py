"""The sandbox server counts the account stack of `gpuflow setup --sandbox` as something it holds, so it
keeps the stack across commands (as it keeps instances) instead of exiting with it when idle."""

from __future__ import annotations

from gpuflow.durable import stack
from infra.sandbox.serve import held_resources
from tests.infra.cloud import REGION


def test_a_deployed_account_stack_is_held_until_deleted(cloud, provisioners, gpuflow_home):
    assert held_resources()["stacks"] == []
    stack.setup(REGION, provisioner_factory=provisioners)
    assert held_resources()["stacks"] == [f"{REGION}/gpuflow-account"]
    stack.delete(REGION, provisioner_factory=provisioners)
    assert held_resources()["stacks"] == []
