"""`gpuflow ssh` and `gpuflow up --key-path` refuse a key that group or others can read
before anything runs: one line with the chmod to run, exit 3 -- no ssh started, nothing
launched (OpenSSH would ignore the key, after the instance was already billing)."""

from __future__ import annotations

import os

import pytest

from gpuflow.cli import main
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore


@pytest.fixture
def loose_key(tmp_path):
    key = tmp_path / "keys" / "cluster.pem"
    key.parent.mkdir()
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot read: its mode is refused first\n")
    key.chmod(0o644)
    return key


def _assert_one_chmod_line(exit_info, err: str, key) -> None:
    assert exit_info.value.code == 3, err
    assert err.splitlines() == [err.strip()] and f"chmod 600 {key}" in err and "0644" in err


def test_gpuflow_ssh_refuses_a_loose_key_before_running_ssh(gpuflow_home, loose_key, tmp_path, monkeypatch, capsys):
    from gpuflow import nodes

    # A hand-made sandbox record: its fake cloud is taken to say the instance runs.
    monkeypatch.setattr(nodes.ProvisionerProbe, "instance_state", lambda self, cluster, instance_id: "running")
    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678",
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),), sandbox=True,
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    host_key = tmp_path / "host_key.pub"
    host_key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjp7H/j4yi+qatVy0olrvXvY0qblbqcy1bObYqKy83U\n")
    monkeypatch.setenv("GPUFLOW_SANDBOX_SSH", f"host=127.0.0.1,port=1,user=me,key={loose_key},host_key={host_key}")
    executed: list[list[str]] = []

    def no_exec(program, argv):
        executed.append(list(argv))
        raise SystemExit(99)

    monkeypatch.setattr(os, "execvp", no_exec)
    with pytest.raises(SystemExit) as exit_info:
        main(["ssh", "box", "--", "true"])
    _assert_one_chmod_line(exit_info, capsys.readouterr().err, loose_key)
    assert executed == []


def test_up_with_a_loose_key_path_refuses_before_launching(gpuflow_home, loose_key, tmp_path, monkeypatch, capsys):
    from gpuflow import clusters

    launched: list[object] = []
    monkeypatch.setattr(clusters, "up", lambda *args, **kwargs: launched.append(args) or pytest.fail("launched"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "box", "--sandbox", "--key-name", "mine", "--key-path", str(loose_key)])
    _assert_one_chmod_line(exit_info, capsys.readouterr().err, loose_key)
    assert launched == []
