"""A private key that group or others may read: OpenSSH refuses it ("bad
permissions"), so gpuflow says so and how to fix it (`chmod 600 PATH`), exit 3,
instead of `cannot reach host` (exit 6).  Against the real loopback sshd."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import pytest

from gpuflow.cli import main
from gpuflow.errors import CredentialsError
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.transport.keys import check_key_permissions, key_permission_error
from gpuflow.transport.ssh import SSHRunner
from tests.transport.conftest import target_for

pytestmark = pytest.mark.ssh


@pytest.fixture
def loose_key(sshd_session, tmp_path):
    """A copy of the server's authorised client key, readable by everyone."""
    key = tmp_path / "keys" / "cluster.pem"
    key.parent.mkdir()
    shutil.copy(sshd_session.client_key, key)
    key.chmod(0o644)
    return key


def _openssh(sshd_session, key, known_hosts) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-p", str(sshd_session.port), f"{sshd_session.user}@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60,
    )


def test_openssh_refuses_the_key_and_gpuflow_reads_why(sshd_session, pinned_known_hosts, loose_key):
    """The premise, on the real OpenSSH client: the loose key is refused, the
    same key at 0600 is accepted; and gpuflow turns the refusal into its error."""
    refused = _openssh(sshd_session, loose_key, pinned_known_hosts)
    assert refused.returncode == 255 and "bad permissions" in refused.stderr
    error = key_permission_error(refused.stderr, str(loose_key))
    assert isinstance(error, CredentialsError) and f"chmod 600 {loose_key}" in error.one_line()
    assert key_permission_error("Permission denied (publickey).", str(loose_key)) is None  # another refusal

    loose_key.chmod(0o600)
    assert _openssh(sshd_session, loose_key, pinned_known_hosts).returncode == 0


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_the_ssh_runner_reports_the_permissions_before_connecting(sshd_session, pinned_known_hosts, loose_key,
                                                                   tmp_path, mode):
    loose_key.chmod(mode)
    marker = tmp_path / "ran"
    target = target_for(sshd_session, pinned_known_hosts)
    runner = SSHRunner(replace(target, key_path=str(loose_key)), base_dir=str(tmp_path / "base"))
    with pytest.raises(CredentialsError) as raised:
        runner.run(["touch", str(marker)])
    line = raised.value.one_line()
    assert f"{loose_key}" in line and f"mode {mode:04o}" in line and f"chmod 600 {loose_key}" in line
    assert raised.value.exit_code == 3 and "\n" not in line
    assert runner.connections_made == 0 and not marker.exists()

    loose_key.chmod(0o600)  # the fix the message gives works
    runner.run(["touch", str(marker)])
    assert marker.exists()


def test_a_key_owned_by_someone_else_is_left_to_ssh(loose_key, monkeypatch):
    """OpenSSH checks the mode only of keys the user owns: so does gpuflow."""
    import os

    monkeypatch.setattr(os, "getuid", lambda: loose_key.stat().st_uid + 1)
    check_key_permissions(str(loose_key))  # no error
    monkeypatch.undo()
    with pytest.raises(CredentialsError):
        check_key_permissions(str(loose_key))


def test_sync_through_openssh_says_chmod_not_cannot_reach(sshd_session, loose_key, gpuflow_home, tmp_path,
                                                          monkeypatch, capsys):
    """`gpuflow sync` of a sandbox cluster reached through the loopback sshd
    with a 0644 key: one line, exit 3, the chmod to run; nothing sent."""
    from tests.sync.conftest import _hand_made_sandbox_instances_run

    _hand_made_sandbox_instances_run(monkeypatch)  # a hand-made record: no fake cloud holds its instance
    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678",
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),), sandbox=True,
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    monkeypatch.setenv(
        "GPUFLOW_SANDBOX_SSH",
        f"host=127.0.0.1,port={sshd_session.port},user={sshd_session.user},key={loose_key},"
        f"host_key={sshd_session.directory / 'ssh_host_ed25519_key.pub'}",
    )
    project = tmp_path / "proj"
    project.mkdir()
    (project / "gpuflow.toml").write_text("")
    (project / "train.py").write_text("print(1)\n")
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as exit_info:
        main(["sync", "box"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3, err
    assert err.splitlines() == [err.strip()] and f"chmod 600 {loose_key}" in err and "cannot reach" not in err
    assert not (gpuflow_home / "sandbox" / "box" / "i-0123456789abcdef0" / "project" / "train.py").exists()
