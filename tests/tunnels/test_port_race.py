"""A local port is chosen by probing, so another process may take it before gpuflow's listener binds it (two
`gpuflow tensorboard` or `forward` started at once, as parallel test workers do): the forward, or the local
TensorBoard, then moves to the next free port (said in one line) instead of failing, and what is recorded for
`gpuflow status` is the port that listens."""

from __future__ import annotations

import contextlib
import socket
import urllib.request

import pytest

from gpuflow.tunnels.forward import hold_forwards, plan_forward
from gpuflow.tunnels.ports import Forward
from gpuflow.tunnels.registry import open_tunnels
from tests.tunnels.gpuflow_with_running_cloud import RunningCloud


@contextlib.contextmanager
def _taken_port():
    """A port another process took just after gpuflow found it free: one this test listens on."""
    thief = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    thief.bind(("127.0.0.1", 0))
    thief.listen(1)
    try:
        yield thief.getsockname()[1]
    finally:
        thief.close()


class _Up(Exception):
    pass


@pytest.mark.parametrize("reach", ["relay", pytest.param("sshd", marks=pytest.mark.ssh)])
def test_a_forward_whose_local_port_was_taken_meanwhile_listens_on_the_next_free_one(
    reach, sandbox_cluster, instance_http, request
):
    if reach == "sshd":
        request.getfixturevalue("through_sshd")
    said: list[str] = []
    seen: dict = {}

    def ready(tunnel) -> None:
        [moved] = tunnel.forwards
        seen["forward"] = moved
        seen["recorded"] = open_tunnels("box")
        with urllib.request.urlopen(f"http://127.0.0.1:{moved.local}/moved", timeout=10) as response:
            seen["answer"] = response.read()
        raise _Up

    with _taken_port() as taken:
        plan = plan_forward(sandbox_cluster, [Forward(instance_http, taken)], probe=RunningCloud())
        with pytest.raises(_Up):
            hold_forwards(sandbox_cluster, plan, say=said.append, on_ready=ready)
    moved = seen["forward"]
    assert moved.remote == instance_http and moved.local != taken
    assert seen["answer"] == b"hello from the instance: /moved"
    assert f"local port {taken} was taken meanwhile: using {moved.local}" in said
    [recorded] = seen["recorded"]
    assert recorded.forwards == (moved,)  # `gpuflow status` shows the port that listens
    assert open_tunnels("box") == []


@pytest.mark.slow
def test_a_local_tensorboard_whose_port_was_taken_meanwhile_serves_on_the_next_free_one(
    tmp_path, tensorboard_without_tensorflow
):
    pytest.importorskip("tensorboard")
    from gpuflow.tunnels.tensorboard import LocalTensorBoard, serves

    said: list[str] = []
    with _taken_port() as taken:
        server = LocalTensorBoard(tmp_path, Forward(taken, taken), say=said.append)
        try:
            server.start()
            assert server.forward.local != taken and server.forward.remote == server.forward.local
            assert serves(server.forward.url, str(tmp_path)) and server.ended() is None
        finally:
            server.stop()
    assert f"local port {taken} was taken meanwhile: using {server.forward.local}" in said
