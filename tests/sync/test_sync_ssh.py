"""SSH-only behaviour: pinned host keys, unreachable hosts, method choice."""

from __future__ import annotations

import dataclasses
import time

import pytest

from gpuflow.errors import HostKeyMismatch, SecurityError, UnreachableHost
from gpuflow.sync import SSHDestination, sync_directory
from tests.sshd import free_port
from tests.sync.conftest import make_target

pytestmark = pytest.mark.ssh


def test_a_changed_host_key_refuses_the_sync(project, sshd, tmp_path):
    target = make_target(sshd, tmp_path / "known_hosts")  # pinned: the original key
    sshd.stop()
    sshd.regenerate_host_key()
    sshd.start(port=target.port)
    remote = tmp_path / "remote"
    started = time.monotonic()

    for method in ("auto", "tar"):
        with pytest.raises(HostKeyMismatch) as caught:
            sync_directory(project, SSHDestination(target, str(remote)), method=method)
        assert "does not match the key pinned" in caught.value.one_line()
        assert "\n" not in caught.value.one_line()
    assert time.monotonic() - started < 20
    assert not remote.exists()


def test_an_unknown_host_key_is_never_accepted(project, sshd_session, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    target = dataclasses.replace(make_target(sshd_session, tmp_path / "kh"), known_hosts_path=str(empty))

    with pytest.raises(HostKeyMismatch, match="no key pinned"):
        sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))
    assert empty.read_text() == ""


def test_no_known_hosts_file_is_a_security_error(project, sshd_session, tmp_path):
    target = dataclasses.replace(make_target(sshd_session, tmp_path / "kh"), known_hosts_path=None)

    with pytest.raises(SecurityError, match="no pinned host key"):
        sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))


def test_an_unreachable_host_fails_fast_with_one_line(project, sshd_session, tmp_path):
    target = dataclasses.replace(make_target(sshd_session, tmp_path / "kh"), port=free_port())

    with pytest.raises(UnreachableHost, match="cannot reach 127.0.0.1") as caught:
        sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))
    assert "\n" not in caught.value.one_line()


def test_auto_prefers_rsync_when_both_ends_have_it(project, sshd_session, tmp_path):
    target = make_target(sshd_session, tmp_path / "kh")
    report = sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))
    assert report.method == "rsync"
    assert (tmp_path / "remote" / "train.py").is_file()


def test_tar_is_used_when_the_remote_has_no_rsync(project, sshd_session, tmp_path, monkeypatch):
    import gpuflow.sync as sync_module

    target = make_target(sshd_session, tmp_path / "kh")
    monkeypatch.setattr(sync_module, "_PROBE_SCRIPT", sync_module._PROBE_SCRIPT.replace("command -v rsync", "false"))

    report = sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))

    assert report.method == "tar"
    assert (tmp_path / "remote" / "pkg" / "model.py").read_text() == "LAYERS = 3\n"


def test_a_file_replaced_by_a_directory_and_back(project, make_destination, tmp_path):
    destination, remote, method = make_destination("tar")
    sync_directory(project, destination, method=method)
    (project / "train.py").unlink()
    (project / "train.py").mkdir()
    (project / "train.py" / "main.py").write_text("x")
    (project / "pkg" / "model.py").unlink()
    (project / "pkg" / "data.csv").unlink()
    (project / "pkg").rmdir()
    (project / "pkg").write_text("now a file")

    sync_directory(project, destination, method=method)

    assert (remote / "train.py" / "main.py").read_text() == "x"
    assert (remote / "pkg").read_text() == "now a file"
