"""One OpenSSH option builder: sync, `gpuflow ssh` and `gpuflow ssh-config` reach a node with the same settings.

Compared as OpenSSH itself resolves them (``ssh -G``, which connects nowhere),
so a setting spelt differently but meaning the same still compares equal, and
one that differs in any way (a timeout, a known_hosts file, ~/.ssh/config read
by one and not the other) does not.
"""

from __future__ import annotations

import subprocess

import pytest

from gpuflow import nodes, ssh_config
from gpuflow.config import gpuflow_home
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.sync import SSHDestination, destination_for, ssh_argv
from gpuflow.transport import hostkeys

pytestmark = pytest.mark.ssh

# What pins a connection to the cluster's key and host keys, and keeps it alive or gives it up.
PINNING = (
    "user", "port", "identityfile", "identitiesonly", "userknownhostsfile", "globalknownhostsfile",
    "stricthostkeychecking", "checkhostip", "serveraliveinterval", "serveralivecountmax", "connecttimeout",
)


def _resolved(argv: list[str]) -> dict[str, list[str]]:
    """``ssh -G`` of an ssh command line (options and destination, no command)."""
    assert argv[0] == "ssh"
    output = subprocess.run(["ssh", "-G", *argv[1:]], capture_output=True, text=True, check=True, timeout=30).stdout
    values: dict[str, list[str]] = {}
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    return values


@pytest.fixture
def cluster(sshd_session, tmp_path) -> Cluster:
    """A running instance (the loopback sshd's address) whose host key is already pinned."""
    record = Cluster(
        name="web", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),),
        key_path=str(tmp_path / "key dir" / "id_ed25519"),  # a space: quoting must agree too
        ssh_user="ubuntu", ssh_port=sshd_session.port,
    )
    StateStore(gpuflow_home(), "clusters").put(record.name, record.to_dict())
    hostkeys.pin_host_keys(nodes.known_hosts_path(record.name), "127.0.0.1", sshd_session.port,
                           [hostkeys.parse_public_key(sshd_session.host_public_key)])
    return record


def test_sync_and_gpuflow_ssh_use_the_same_options_for_a_cluster(cluster):
    destination = destination_for(cluster, "project")
    assert isinstance(destination, SSHDestination)
    sync_settings = _resolved([*ssh_argv(destination.target), destination.target.host])

    invocation = nodes.ssh_invocation(cluster, ["true"])
    argv = list(invocation.argv)
    separator = argv.index("--")
    ssh_settings = _resolved([*argv[:separator], argv[separator + 1]])
    # `gpuflow ssh` alone shares its connection across commands (tests/transport/test_openssh_sharing.py).
    sharing = ("controlmaster", "controlpath", "controlpersist")
    assert ssh_settings["controlmaster"] == ["auto"] and sync_settings.get("controlmaster") != ["auto"]
    for key in sharing:
        ssh_settings.pop(key, None), sync_settings.pop(key, None)

    assert sync_settings == ssh_settings
    assert sync_settings["connecttimeout"] == ["15"]
    assert sync_settings["stricthostkeychecking"] == ["true"]
    assert sync_settings["batchmode"] == ["yes"]
    assert sync_settings["userknownhostsfile"] == [str(nodes.known_hosts_path("web"))]
    assert sync_settings["identityfile"] == [cluster.key_path]


def test_ssh_config_pins_and_times_out_as_gpuflow_ssh_does(cluster):
    report = ssh_config.write_ssh_config([cluster])
    config_settings = _resolved(["ssh", "-F", str(report.path), "web"])
    invocation = nodes.ssh_invocation(cluster, ["true"])
    argv = list(invocation.argv)
    separator = argv.index("--")
    ssh_settings = _resolved([*argv[:separator], argv[separator + 1]])

    assert {key: config_settings[key] for key in PINNING} == {key: ssh_settings[key] for key in PINNING}
