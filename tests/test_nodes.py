"""gpuflow.nodes and the `gpuflow ssh` / `gpuflow ssh-config` commands, with
cluster records pointing at a real loopback OpenSSH server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuflow import clusters, nodes, ssh_config
from gpuflow.config import gpuflow_home
from gpuflow.errors import ConfigError, HostKeyMismatch, InstanceGone, UnreachableHost, UsageError
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore, validate_name
from gpuflow.transport import hostkeys
from gpuflow.transport.local import LocalRunner
from gpuflow.transport.ssh import Backoff, SSHRunner
from tests.transport.console_sample import console_output, fingerprint_line, server_console_output

HOSTILE = ["$(touch pwned)", "; touch pwned", "a && b", "'q\"", "*", "new\nline", "ü ✓"]
PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


def make_cluster(server, name: str = "web", *, sandbox: bool = False, nodes: int = 1) -> Cluster:
    cluster = Cluster(
        name=name,
        region="us-east-1",
        instance_type="g5.xlarge",
        ami="ami-0123456789abcdef0",
        nodes=tuple(Node(f"i-0{index:016x}", "running", public_ip="127.0.0.1") for index in range(1, nodes + 1)),
        key_path=str(server.client_key),
        ssh_user=server.user,
        ssh_port=server.port,
        sandbox=sandbox,
    )
    StateStore(gpuflow_home(), "clusters").put(name, cluster.to_dict())
    return cluster


def make_sandbox_cluster(server, name: str = "sbx") -> Cluster:
    """A sandbox cluster record whose instance the sandbox's fake cloud runs (its server
    for this gpuflow home: the CLI in a subprocess asks the same one); stopped at teardown."""
    import boto3

    from infra.sandbox import sandbox_endpoint

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox_endpoint(gpuflow_home()),
                       aws_access_key_id="gpuflow-sandbox", aws_secret_access_key="gpuflow-sandbox")
    [instance] = ec2.run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1)["Instances"]
    cluster = make_cluster(server, name, sandbox=True)
    cluster = Cluster.from_dict({**cluster.to_dict(), "nodes": [Node(instance["InstanceId"], "running").to_dict()]})
    StateStore(gpuflow_home(), "clusters").put(name, cluster.to_dict())
    return cluster


@pytest.fixture(autouse=True)
def _no_sandbox_server_left():
    yield
    from infra.sandbox import stop_sandbox

    stop_sandbox(gpuflow_home())


def sandbox_ssh_env(server) -> str:
    return (
        f"host=127.0.0.1,port={server.port},user={server.user},key={server.client_key},"
        f"host_key={server.host_key}.pub"
    )


def test_runner_for_pins_host_keys_from_the_console_then_connects(sshd_session, fake_cloud, tmp_path):
    cluster = make_cluster(sshd_session)
    fake_cloud.console = server_console_output(sshd_session)
    runner = nodes.runner_for(cluster, probe=fake_cloud, base_dir=str(tmp_path / "base"))
    assert isinstance(runner, SSHRunner)
    assert json.loads(runner.run([sys.executable, "-c", PRINT_ARGV, *HOSTILE]).stdout) == HOSTILE
    runner.close()
    pinned = hostkeys.pinned_keys(nodes.known_hosts_path("web"), "127.0.0.1", sshd_session.port)
    assert pinned == [hostkeys.parse_public_key(sshd_session.host_public_key)]
    # Pinned once: later runners do not ask the console again.
    nodes.runner_for(cluster, probe=fake_cloud, base_dir=str(tmp_path / "base")).run(["true"])
    assert fake_cloud.console_calls == 1


def test_console_keys_of_another_host_refuse_the_connection(sshd_session, fake_cloud, tmp_path):
    cluster = make_cluster(sshd_session)
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    public = Path(f"{other}.pub")
    fake_cloud.console = console_output([public.read_text().strip()], [fingerprint_line(public)])
    with pytest.raises(HostKeyMismatch):
        nodes.runner_for(cluster, probe=fake_cloud, base_dir=str(tmp_path / "base"), backoff=Backoff(retries=0)).run(["true"])
    assert not (tmp_path / "base").exists()


def test_console_without_keys_needs_the_explicit_trust_flag(sshd_session, fake_cloud, tmp_path, capsys):
    cluster = make_cluster(sshd_session)
    fake_cloud.console = "[   3.1] cloud-init[600]: Cloud-init v. 24.1.3 running 'init-local'\r\n"
    with pytest.raises(UnreachableHost, match="still booting") as raised:
        nodes.runner_for(cluster, probe=fake_cloud)
    assert "--trust-on-first-use" in raised.value.one_line()
    runner = nodes.runner_for(cluster, trust_on_first_use=True, probe=fake_cloud, base_dir=str(tmp_path / "base"))
    runner.run(["true"])
    runner.close()
    assert "gpuflow: warning: trusting" in capsys.readouterr().err
    assert hostkeys.pinned_keys(nodes.known_hosts_path("web"), "127.0.0.1", sshd_session.port)


def test_fingerprints_only_console_pins_the_matching_key(sshd_session, fake_cloud, tmp_path):
    cluster = make_cluster(sshd_session)
    fake_cloud.console = server_console_output(sshd_session, include_keys=False)
    runner = nodes.runner_for(cluster, probe=fake_cloud, base_dir=str(tmp_path / "base"))
    runner.run(["true"])
    runner.close()
    pinned = hostkeys.pinned_keys(nodes.known_hosts_path("web"), "127.0.0.1", sshd_session.port)
    assert [key.fingerprint for key in pinned] == [hostkeys.parse_public_key(sshd_session.host_public_key).fingerprint]


def test_a_terminated_instance_is_told_apart_from_a_network_blip(sshd, fake_cloud, tmp_path):
    cluster = make_cluster(sshd)
    fake_cloud.console = server_console_output(sshd)
    slept: list[float] = []
    runner = nodes.runner_for(cluster, probe=fake_cloud, base_dir=str(tmp_path / "base"), sleep=slept.append)
    runner.run(["true"])
    sshd.stop()
    fake_cloud.state = "terminated"
    with pytest.raises(InstanceGone):
        runner.run(["true"])
    assert fake_cloud.state_calls == 1 and slept == []


def test_no_address_yet_is_a_clear_error(sshd_session):
    cluster = make_cluster(sshd_session)
    booting = Cluster.from_dict({**cluster.to_dict(), "nodes": [Node("i-0abc", "pending").to_dict()]})
    with pytest.raises(UnreachableHost, match="has no IP address"):
        nodes.ssh_target_for(booting)


def test_sandbox_runs_locally_or_through_a_configured_loopback_sshd(sshd_session, monkeypatch, tmp_path):
    cluster = make_sandbox_cluster(sshd_session, "sbx")
    local = nodes.runner_for(cluster)
    expected = gpuflow_home() / "sandbox" / "sbx" / cluster.head.instance_id
    assert isinstance(local, LocalRunner) and local.base_dir == str(expected.resolve())
    monkeypatch.setenv(nodes.ENV_SANDBOX_SSH, sandbox_ssh_env(sshd_session))
    over_ssh = nodes.runner_for(cluster)
    assert isinstance(over_ssh, SSHRunner)
    assert over_ssh.run(["pwd"]).stdout.decode().strip() == str(expected.resolve())
    over_ssh.close()
    monkeypatch.setenv(nodes.ENV_SANDBOX_SSH, sandbox_ssh_env(sshd_session).replace("127.0.0.1", "198.51.100.7"))
    with pytest.raises(ConfigError, match="not a loopback address"):
        nodes.runner_for(cluster)
    monkeypatch.setenv(nodes.ENV_SANDBOX_SSH, "port=22")
    with pytest.raises(ConfigError, match="lacks user, key, host_key"):
        nodes.runner_for(cluster)


def _ssh_g(config: Path, alias: str) -> dict[str, str]:
    output = subprocess.run(
        ["ssh", "-G", "-F", str(config), alias], capture_output=True, text=True, check=True
    ).stdout
    values: dict[str, str] = {}
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, value)
    return values


def test_ssh_config_round_trips_through_openssh(sshd_session, monkeypatch, tmp_path):
    make_cluster(sshd_session, "web", nodes=2)
    make_cluster(sshd_session, "sbx", sandbox=True)
    report = ssh_config.write_ssh_config(clusters.known_clusters())
    assert report.path == gpuflow_home() / "ssh_config"
    assert report.hosts == ("web", "web+1") and report.skipped[0].startswith("sbx: sandbox")
    values = _ssh_g(report.path, "web+1")
    assert values["hostname"] == "127.0.0.1"
    assert values["user"] == sshd_session.user
    assert values["port"] == str(sshd_session.port)
    assert values["identityfile"] == str(sshd_session.client_key)
    assert values["userknownhostsfile"] == str(nodes.known_hosts_path("web"))
    assert values["stricthostkeychecking"] == "true"
    assert values["identitiesonly"] == "yes"
    assert values["serveraliveinterval"] == "15"
    # The Include line, once, at the top of ~/.ssh/config.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    user_config = tmp_path / "home" / ".ssh" / "config"
    user_config.parent.mkdir(parents=True)
    user_config.write_text("Host other\n    User someone\n")
    assert ssh_config.install_ssh_include(report.include_line) is True
    assert ssh_config.install_ssh_include(report.include_line) is False
    text = user_config.read_text()
    assert text.count("Include ") == 1 and text.index("Include ") < text.index("Host other")
    assert _ssh_g(user_config, "web")["port"] == str(sshd_session.port)


def test_ssh_config_aliases_are_unique_whatever_the_cluster_names(sshd_session):
    # A 2-node cluster `a` and clusters named like its second node under any scheme
    # built from name characters: every alias is distinct, and each reaches its own cluster.
    make_cluster(sshd_session, "a", nodes=3)
    for name in ("a-1", "a.1", "a_1", "a-2"):
        make_cluster(sshd_session, name)
    report = ssh_config.write_ssh_config(clusters.known_clusters())
    assert len(set(report.hosts)) == len(report.hosts) == 7
    assert set(report.hosts) == {"a", "a+1", "a+2", "a-1", "a.1", "a_1", "a-2"}
    for name in ("a-1", "a.1", "a_1", "a-2"):
        assert _ssh_g(report.path, name)["userknownhostsfile"] == str(nodes.known_hosts_path(name))
    for alias in ("a", "a+1", "a+2"):
        assert _ssh_g(report.path, alias)["userknownhostsfile"] == str(nodes.known_hosts_path("a"))
    text = report.path.read_text()
    assert [line for line in text.splitlines() if line.startswith("Host ")] == [f"Host {alias}" for alias in report.hosts]
    with pytest.raises(UsageError):  # the separator can never start a cluster name of its own
        validate_name("a+1", "cluster name")


def _gpuflow(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpuflow", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=os.getcwd(),
    )


def test_cli_ssh_runs_a_command_with_arguments_literally(sshd_session):
    cluster = make_cluster(sshd_session)
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", sshd_session.port,
                           [hostkeys.parse_public_key(sshd_session.host_public_key)])
    completed = _gpuflow("ssh", "web", "--", sys.executable, "-c", PRINT_ARGV, *HOSTILE)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == HOSTILE
    failing = _gpuflow("ssh", "web", "--", "sh", "-c", "exit 7")
    assert failing.returncode == 7  # the remote command's exit code


def test_cli_ssh_refuses_a_changed_host_key(sshd_session, tmp_path):
    cluster = make_cluster(sshd_session)
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", sshd_session.port,
                           [hostkeys.parse_public_key(Path(f"{other}.pub").read_text())])
    marker = tmp_path / "ran"
    completed = _gpuflow("ssh", "web", "--", "touch", str(marker))
    assert completed.returncode == 255 and not marker.exists()
    assert "host key" in completed.stderr.lower()


def test_cli_ssh_config_and_sandbox_ssh(sshd_session, tmp_path):
    cluster = make_sandbox_cluster(sshd_session, "sbx")
    completed = _gpuflow("ssh", "sbx", "--", "pwd")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str((gpuflow_home() / "sandbox" / "sbx" / cluster.head.instance_id).resolve())
    over_ssh = _gpuflow(
        "ssh", "sbx", "--", "sh", "-c", 'pwd; echo "$1"', "sh", "$(hostile)",
        GPUFLOW_SANDBOX_SSH=sandbox_ssh_env(sshd_session),
    )
    assert over_ssh.returncode == 0, over_ssh.stderr
    assert over_ssh.stdout == completed.stdout + "$(hostile)\n"  # same directory, argument literal
    written = _gpuflow("ssh-config", GPUFLOW_SANDBOX_SSH=sandbox_ssh_env(sshd_session))
    assert written.returncode == 0, written.stderr
    assert "Include " in written.stdout and "1 host(s): sbx" in written.stdout
    assert _ssh_g(gpuflow_home() / "ssh_config", "sbx")["port"] == str(sshd_session.port)


def test_cli_errors_are_one_line(sshd_session):
    missing = _gpuflow("ssh", "nope", "--", "true")
    assert missing.returncode == 4 and missing.stderr.startswith("gpuflow: error: no cluster named 'nope'")
    make_cluster(sshd_session)
    node = _gpuflow("ssh", "web", "--node", "i-ffff", "--", "true")
    assert node.returncode == UsageError.exit_code and len(node.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("console", ["fingerprints only", "nothing yet, trusted on first use"])
def test_ssh_invocation_pins_before_handing_over_to_openssh(sshd_session, fake_cloud, console, capsys):
    cluster = make_cluster(sshd_session)
    trust = console.startswith("nothing")
    fake_cloud.console = "" if trust else server_console_output(sshd_session, include_keys=False)
    if trust:
        with pytest.raises(UnreachableHost, match="still booting"):
            nodes.ssh_invocation(cluster, ["true"], probe=fake_cloud)
    invocation = nodes.ssh_invocation(cluster, ["echo", "a b", "$(x)"], trust_on_first_use=trust, probe=fake_cloud)
    assert "StrictHostKeyChecking=yes" in invocation.argv and invocation.argv[-1].endswith("; echo 'a b' '$(x)'")
    assert ("without verification" in capsys.readouterr().err) is trust
    completed = subprocess.run(list(invocation.argv), capture_output=True, text=True, timeout=60)
    assert (completed.returncode, completed.stdout) == (0, "a b $(x)\n"), completed.stderr


def test_cli_ssh_touches_the_heartbeat_like_every_connection(sshd_session, tmp_path):
    """`gpuflow ssh` (a shell or a command) keeps the dead-man's switch from
    counting the instance idle: on an instance, over a loopback sshd sandbox,
    and in a local sandbox directory."""
    cluster = make_cluster(sshd_session)
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", sshd_session.port,
                           [hostkeys.parse_public_key(sshd_session.host_public_key)])
    before = int(time.time()) - 1
    # The remote command runs after the touch: it sees the heartbeat's mtime.
    completed = _gpuflow("ssh", "web", "--", "sh", "-c", 'stat -c %Y "$HOME/gpuflow/heartbeat"')
    assert completed.returncode == 0, completed.stderr
    assert int(completed.stdout) >= before
    invocation = nodes.ssh_invocation(cluster)  # an interactive shell: the same touch, then the login shell
    assert invocation.argv[-1].endswith('exec "${SHELL:-/bin/sh}" -l') and "-t" in invocation.argv
    assert "heartbeat" in invocation.argv[-1]

    sandbox_cluster = make_sandbox_cluster(sshd_session, "sbx")
    heartbeat = gpuflow_home() / "sandbox" / "sbx" / sandbox_cluster.head.instance_id / "heartbeat"
    assert _gpuflow("ssh", "sbx", "--", "true").returncode == 0
    assert heartbeat.stat().st_mtime >= before
    heartbeat.unlink()
    over_ssh = _gpuflow("ssh", "sbx", "--", "true", GPUFLOW_SANDBOX_SSH=sandbox_ssh_env(sshd_session))
    assert over_ssh.returncode == 0, over_ssh.stderr
    assert heartbeat.stat().st_mtime >= before


def test_the_cloud_is_asked_through_the_probe_of_the_clusters_own_place(sshd_session):
    """What reaching a node asks the cloud goes to a provisioner of the cluster's own
    region, profile and sandbox (the probe the cluster use cases build), and
    gpuflow.nodes never imports the use cases (no clusters <-> nodes cycle)."""
    import ast

    asked: list[tuple] = []

    class Provisioner:
        def __init__(self, region, profile, sandbox):
            self.place = (region, profile, sandbox)

        def instance_state(self, instance_id):
            asked.append(("state", *self.place, instance_id))
            return "stopped"

        def console_output(self, instance_id):
            asked.append(("console", *self.place, instance_id))
            return ""

    def factory(region, *, profile=None, sandbox=False):
        return Provisioner(region, profile, sandbox)

    cluster = Cluster.from_dict({**make_cluster(sshd_session).to_dict(), "region": "eu-west-1", "profile": "lab"})
    probe = clusters.cloud_probe(factory)
    assert nodes.instance_alive_hook(cluster, "i-0abc", probe)() is False
    with pytest.raises(UnreachableHost, match="still booting"):
        nodes.runner_for(cluster, probe=probe)
    assert asked == [("state", "eu-west-1", "lab", False, "i-0abc"),
                     ("console", "eu-west-1", "lab", False, cluster.head.instance_id)]
    tree = ast.parse(Path(nodes.__file__).read_text())
    imported = {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "gpuflow.transport.hostkeys" in imported  # the check sees `from gpuflow.transport import X`
    assert not [name for name in imported if name.startswith(("gpuflow.clusters", "gpuflow.jobs", "gpuflow.sync"))]
