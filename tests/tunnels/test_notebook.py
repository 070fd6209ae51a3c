"""`gpuflow notebook`: a real Jupyter server on the sandbox instance, its token, reattach, --stop, the security group untouched."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gpuflow import clusters, nodes
from gpuflow.procs import identity
from gpuflow.tunnels.forward import plan_forward
from gpuflow.tunnels.notebook import start_notebook, stop_notebook
from gpuflow.cli import app, run_app
from gpuflow.tunnels.ports import Forward
from gpuflow.tunnels.registry import TunnelKind, registered
from infra.sandbox import in_process_sandbox
from tests.sshd import free_port
from tests.waiting import wait_for

pytest.importorskip("jupyter_server")
pytestmark = pytest.mark.slow


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _lines(stream) -> list[str]:
    """The lines of ``stream`` as they come, read by a thread (a test never blocks on a pipe)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True).start()
    return lines


def _answer(url: str) -> int | None:
    """The status of ``url``, None while nothing answers (a tunnel being reopened)."""
    try:
        return _status(url)
    except OSError:
        return None


def _api(url: str, *, token: bool) -> str:
    """The server's API status page through the same forward, with or without the URL's token."""
    base, _, query = url.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/api/status" + (f"?{query}" if token else "")


@pytest.mark.ssh
def test_notebook_through_sshd_prints_a_token_url_reattaches_and_stops(through_sshd, gpuflow_process):
    process = gpuflow_process("notebook", "box")
    url = process.stdout.readline().strip()
    if not url:  # it ended without a URL: say why
        pytest.fail(f"gpuflow notebook ended (exit {process.wait(timeout=30)}) saying: {process.stderr.read()[-3000:]}")
    assert url.startswith("http://127.0.0.1:") and "?token=" in url and len(url.split("token=")[1]) == 48
    assert _status(_api(url, token=True)) == 200
    assert _status(_api(url, token=False)) == 403
    said = _lines(process.stderr)
    through_sshd.drop_sessions()  # the network drops mid-use: the tunnel comes back, the server never left
    assert wait_for(lambda: _answer(_api(url, token=True)), timeout=60, what="the tunnel to reconnect") == 200
    # Bytes pass as soon as the new ssh listens; gpuflow says so one poll later: Ctrl-C only after that line.
    wait_for(lambda: any("reconnected to box" in line for line in said), what="gpuflow to say it reconnected")
    os.kill(process.pid, signal.SIGINT)  # closes the tunnel, not the server
    assert process.wait(timeout=30) == 0
    wait_for(lambda: any("tunnel closed" in line for line in said), what="the notebook's last line")
    first = "".join(said)
    pid = int(first.split("(pid ")[1].split(",")[0])
    server_identity = identity(pid)
    assert server_identity is not None and "started Jupyter" in first and "reconnected to box" in first

    again = gpuflow_process("notebook", "box")
    second_url = again.stdout.readline().strip()
    assert second_url.split("?")[1] == url.split("?")[1]  # the same server, the same token
    assert _status(_api(second_url, token=True)) == 200
    os.kill(again.pid, signal.SIGTERM)
    assert again.wait(timeout=30) == 0
    assert f"reattached to the Jupyter server on box (pid {pid}" in again.stderr.read()

    stopper = gpuflow_process("notebook", "box", "--stop")
    assert stopper.wait(timeout=60) == 0, stopper.stderr.read()
    assert stopper.stdout.read().strip() == "Jupyter server on box stopped"
    assert identity(pid) != server_identity


def test_the_security_group_is_never_changed(project_dir_with_sandbox, capsys):
    cluster, ec2 = project_dir_with_sandbox
    group_id = cluster_group(ec2)
    before = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    runner = nodes.runner_for(cluster, probe=clusters.cloud_probe())
    try:
        server = start_notebook(runner, project_dir=Path.cwd())
        again = start_notebook(runner, project_dir=Path.cwd())
    finally:
        runner.close()
    assert (again.pid, again.token, again.reattached) == (server.pid, server.token, True)
    local = free_port()
    tunnel = plan_forward(cluster, [Forward(server.port, local)], probe=clusters.cloud_probe()).open_tunnel()
    tunnel.start()
    try:
        url = server.url(local)
        assert _status(_api(url, token=True)) == 200 and _status(_api(url, token=False)) == 403
        with registered("nb", cluster.head.instance_id, TunnelKind.NOTEBOOK, [Forward(server.port, local)], url):
            assert run_app(app, ["status", "nb", "--sandbox", "--json"]) == 0
            [listed] = json.loads(capsys.readouterr().out)["tunnels"]
            assert (listed["kind"], listed["url"], listed["pid"]) == ("notebook", url, os.getpid())
            assert run_app(app, ["status", "nb", "--sandbox"]) == 0
            assert f"open notebook: {url} on {cluster.head.instance_id}" in capsys.readouterr().out
    finally:
        tunnel.stop()
    runner = nodes.runner_for(cluster, probe=clusters.cloud_probe())
    try:
        assert stop_notebook(runner) == "stopped"
        assert stop_notebook(runner) == "none"
    finally:
        runner.close()
    assert ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"] == before

    # A notebook left running ends with its (sandbox) instance, as a terminated instance's would.
    runner = nodes.runner_for(cluster, probe=clusters.cloud_probe())
    try:
        left = start_notebook(runner, project_dir=Path.cwd())
    finally:
        runner.close()
    left_identity = identity(left.pid)
    clusters.down("nb", sandbox=True)
    assert left_identity is not None and left.token != server.token  # a new server, a fresh token
    # SIGKILL lands a moment after it is sent: wait for it, never check on arrival.
    wait_for(lambda: identity(left.pid) != left_identity, what="the notebook to end with its instance")


def cluster_group(ec2) -> str:
    groups = [g for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"]
    assert len(groups) == 1
    return groups[0]["GroupId"]


@pytest.fixture
def project_dir_with_sandbox(tmp_path, monkeypatch, gpuflow_home):
    import boto3

    monkeypatch.chdir(tmp_path)
    with in_process_sandbox():
        cluster = clusters.up(clusters.resolve_spec("nb", {"sandbox": True}, project_dir=tmp_path))
        try:
            yield cluster, boto3.client("ec2", region_name=cluster.region)
        finally:
            if any(known.name == "nb" for known in clusters.known_clusters()):
                clusters.down("nb", sandbox=True)
