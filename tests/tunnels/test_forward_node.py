"""`gpuflow forward`: the same ssh options as `gpuflow ssh` (one option builder), and `--node` reaching another node."""

from __future__ import annotations

import contextlib
import socket
import urllib.request

import pytest

from gpuflow import nodes
from gpuflow.cli import app, run_app
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.tunnels.forward import forward_argv, plan_forward
from gpuflow.tunnels.ports import Forward
from tests.tunnels.gpuflow_with_running_cloud import RunningCloud
from tests.waiting import wait_for

WORKER = "i-0fedcba9876543210"


@pytest.mark.ssh
def test_the_forward_runs_ssh_with_gpuflow_ssh_options(through_sshd, sandbox_cluster):
    invocation = nodes.ssh_invocation(sandbox_cluster, ["true"], probe=RunningCloud())
    reached = nodes.openssh_node(sandbox_cluster, sandbox_cluster.head, probe=RunningCloud())
    options = nodes.openssh_argv(reached.target)  # the one builder's: pinned host keys, key, BatchMode, keepalives
    argv = forward_argv(reached.target, [Forward(8888, 18888)], reached.base_dir)
    assert options[:3] == ["ssh", "-F", "none"] and "StrictHostKeyChecking=yes" in options
    assert list(invocation.argv[: len(options)]) == options == argv[: len(options)]
    assert argv[len(options):len(options) + 5] == [
        "-o", "ExitOnForwardFailure=yes", "-T", "-L", "127.0.0.1:18888:127.0.0.1:8888"
    ]


@pytest.fixture
def two_nodes(gpuflow_home):
    """A sandbox cluster of two nodes without sshd (each node a directory here)."""
    cluster = Cluster(
        name="pair", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678", sandbox=True,
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),
               Node(WORKER, "running", public_ip="127.0.0.1")),
    )
    StateStore(gpuflow_home, "clusters").put("pair", {**cluster.to_dict(), "phase": "up"})
    for node in cluster.nodes:
        (gpuflow_home / "sandbox" / "pair" / node.instance_id).mkdir(parents=True)
    return cluster


def test_node_picks_the_instance_forwarded_to(two_nodes, instance_http, gpuflow_home):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        local = holder.getsockname()[1]
    plan = plan_forward(two_nodes, [Forward(instance_http, local)], instance_id=WORKER, probe=RunningCloud())
    assert (plan.instance_id, plan.describe) == (WORKER, f"pair ({WORKER})")
    tunnel = plan.open_tunnel()
    tunnel.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/worker", timeout=5) as response:
            assert response.read() == b"hello from the instance: /worker"
        wait_for((gpuflow_home / "sandbox" / "pair" / WORKER / "heartbeat").is_file, what="the worker's heartbeat")
        assert not (gpuflow_home / "sandbox" / "pair" / "i-0123456789abcdef0" / "heartbeat").exists()
    finally:
        tunnel.stop()


def test_an_unknown_node_is_one_error_line(two_nodes, capsys):
    with socket.socket() as taken:  # 8888 taken here (as a parallel test's notebook may hold it): no port line either
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past a closed connection's TIME_WAIT
        with contextlib.suppress(OSError):
            taken.bind(("127.0.0.1", 8888))
            taken.listen(1)
        assert run_app(app, ["forward", "pair", "8888", "--node", "i-nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no instance 'i-nope'" in err and WORKER in err
