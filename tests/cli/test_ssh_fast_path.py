"""The `gpuflow ssh` fast path (gpuflow.ssh_fast) builds exactly the full command's ssh
command line, from the record and the pinned known_hosts alone, imports none of the CLI's
or the transports' machinery, and leaves every case it does not recognise to the full CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuflow import nodes
from gpuflow.config import gpuflow_home
from gpuflow.records import Cluster, Node
from gpuflow.ssh_fast import PINNED_KEY_TYPES, fast_argv
from gpuflow.state import StateStore
from gpuflow.transport import hostkeys

REPOSITORY = Path(__file__).resolve().parents[2]
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
HOSTILE = ["$(touch pwned)", "; touch pwned", "a && b", "'q\"", "*", "ü ✓", "--node"]


@pytest.fixture
def cluster(gpuflow_home, tmp_path) -> Cluster:
    key = tmp_path / "key"
    key.write_text("not read here\n")
    key.chmod(0o600)
    made = Cluster(
        name="web", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
        nodes=(Node("i-01", "running", public_ip="127.0.0.1"), Node("i-02", "running", private_ip="10.0.0.7")),
        key_path=str(key), ssh_user="me", ssh_port=2222,
    )
    _store(made)
    for node in made.nodes:
        _pin(made, node)
    return made


def _store(cluster: Cluster, **changes) -> None:
    StateStore(gpuflow_home(), "clusters").put(cluster.name, {**cluster.to_dict(), **changes})


def _pin(cluster: Cluster, node: Node) -> None:
    target = nodes.ssh_target_for(cluster, node)
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), target.host, target.port,
                           [hostkeys.parse_public_key(HOST_KEY)])


def _full(cluster: Cluster, command: list[str] | None, node: str | None = None) -> list[str]:
    return list(nodes.ssh_invocation(cluster, command, instance_id=node).argv)


def test_the_fast_path_builds_the_full_commands_command_line(cluster):
    assert fast_argv(["ssh", "web", "--", "python3", "-c", "print(1)", *HOSTILE]) == _full(
        cluster, ["python3", "-c", "print(1)", *HOSTILE])
    assert fast_argv(["ssh", "web"]) == _full(cluster, None)  # a login shell, with -t
    assert "-t" in fast_argv(["ssh", "web"])
    for argv in (["ssh", "web", "--node", "i-02", "--", "true"], ["ssh", "--node=i-02", "web", "--", "true"]):
        assert fast_argv(argv) == _full(cluster, ["true"], "i-02")
    assert "me@10.0.0.7" in fast_argv(["ssh", "web", "--node", "i-02"])


@pytest.mark.parametrize("argv", [
    ["ssh", "web", "--"],  # nothing after `--`
    ["ssh", "web", "--trust-on-first-use", "--", "true"],
    ["ssh", "web", "--help"],
    ["ssh", "web", "true"],  # a command without `--`: the grammar's error
    ["ssh", "web", "--node", "i-nope", "--", "true"],
    ["ssh", "web", "--node", "--", "true"],
    ["ssh", "web", "--node", "i-01", "--node", "i-02", "--", "true"],
    ["ssh", "no-such", "--", "true"],
    ["ssh", "../web", "--", "true"],
    ["ssh", "--", "true"],
])
def test_other_command_lines_go_to_the_full_cli(cluster, argv):
    assert fast_argv(argv) is None


def test_records_and_keys_it_does_not_vouch_for_go_to_the_full_cli(cluster, tmp_path):
    assert fast_argv(["ssh", "web", "--", "true"]) is not None
    _store(cluster, sandbox=True)
    assert fast_argv(["ssh", "web", "--", "true"]) is None  # the sandbox's cloud says whether it runs
    for changes in ({"phase": "launching"}, {"phase": "deleted"}, {"nodes": []}, {"ssh_port": "2222"},
                    {"region": None}, {"nodes": [{"instance_id": "i-01", "state": "pending"}]}):
        _store(cluster, **changes)
        assert fast_argv(["ssh", "web", "--", "true"]) is None, changes
    _store(cluster)
    Path(cluster.key_path).chmod(0o644)  # OpenSSH ignores it: the full command says how to fix it
    assert fast_argv(["ssh", "web", "--", "true"]) is None
    Path(cluster.key_path).chmod(0o600)
    known_hosts = nodes.known_hosts_path("web")
    known_hosts.write_text(known_hosts.read_text().replace("[127.0.0.1]:2222", "[127.0.0.1]:2223"))
    assert fast_argv(["ssh", "web", "--", "true"]) is None  # no key pinned for this host: from the console
    assert fast_argv(["ssh", "web", "--node", "i-02", "--", "true"]) is not None  # the other node's still is
    StateStore(gpuflow_home(), "clusters").path("web").write_text("{not json")
    assert fast_argv(["ssh", "web", "--", "true"]) is None  # damaged: the full command says so


def test_it_knows_the_key_types_gpuflow_pins():
    assert set(PINNED_KEY_TYPES) == set(hostkeys.HOST_KEY_TYPES)


def test_the_fast_path_imports_no_cli_cloud_or_transport_machinery(cluster):
    probe = ("import json, sys; from gpuflow.ssh_fast import fast_argv; "
             "print(json.dumps([fast_argv(['ssh', 'web', '--', 'true']), sorted(sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    argv, modules = json.loads(done.stdout)
    assert argv == _full(cluster, ["true"])
    heavy = {"typer", "rich", "click", "paramiko", "boto3", "botocore", "gpuflow.cli", "gpuflow.nodes",
             "gpuflow.config", "gpuflow.records", "gpuflow.provisioner", "gpuflow.transport.ssh", "tomllib",
             "hashlib", "_hashlib", "subprocess", "socket"}  # OpenSSL's hashlib alone costs ~4 ms
    assert not heavy & set(modules)
