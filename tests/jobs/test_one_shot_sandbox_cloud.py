"""`run --up --sandbox --down` chooses its cloud once (gpuflow/provisioner.py): the sandbox server that
holds the account stack of `gpuflow setup --sandbox` when there is one -- so the node's upload sidecar,
another process, reaches its S3 and the run is durable -- else the cloud inside this process."""

from __future__ import annotations

from gpuflow.provisioner import cloud_for_one_shot_run
from infra.aws.client import in_process_mock_active
from infra.sandbox import stop_sandbox


def _uses_this_process(context) -> bool:
    with context:
        return in_process_mock_active()


def test_the_server_holding_the_stack_is_used_else_this_process(gpuflow_home, monkeypatch, tmp_path):
    from gpuflow.cli import app, run_app

    monkeypatch.chdir(tmp_path)
    assert _uses_this_process(cloud_for_one_shot_run("us-east-1"))  # no server: in this process
    try:
        assert run_app(app, ["setup", "--sandbox"]) == 0  # the stack, in this home's sandbox server
        assert _uses_this_process(cloud_for_one_shot_run("us-east-2"))
        assert not _uses_this_process(cloud_for_one_shot_run("us-east-1"))  # the server's cloud
        assert run_app(app, ["setup", "--sandbox", "--delete"]) == 0
        assert _uses_this_process(cloud_for_one_shot_run("us-east-1"))  # the server holds no stack now
    finally:
        stop_sandbox(gpuflow_home)
