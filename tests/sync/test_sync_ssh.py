"""SSH-only behaviour: pinned host keys, unreachable hosts, method choice."""

from __future__ import annotations

import dataclasses
import os
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


def test_a_target_marked_trust_on_first_use_pins_the_presented_key_then_syncs(project, sshd_session, tmp_path, capsys):
    from gpuflow.transport import hostkeys

    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    target = dataclasses.replace(make_target(sshd_session, tmp_path / "kh"), known_hosts_path=str(empty),
                                 trust_on_first_use=True)

    report = sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))

    assert report.files_sent == report.files_considered
    assert hostkeys.pinned_keys(empty, "127.0.0.1", sshd_session.port) == [
        hostkeys.parse_public_key(sshd_session.host_public_key)
    ]
    assert "without verification" in capsys.readouterr().err


def test_no_known_hosts_file_is_a_security_error(project, sshd_session, tmp_path):
    target = dataclasses.replace(make_target(sshd_session, tmp_path / "kh"), known_hosts_path=None)

    with pytest.raises(SecurityError, match="no pinned host key"):
        sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))


def test_an_unreachable_host_fails_fast_with_one_line(project, sshd_session, tmp_path):
    target = dataclasses.replace(make_target(sshd_session, tmp_path / "kh"), port=free_port())

    with pytest.raises(UnreachableHost, match="cannot reach 127.0.0.1") as caught:
        sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))
    assert "\n" not in caught.value.one_line()


def test_auto_uses_rsync_only_where_its_delta_transfer_saves_bytes(project, sshd_session, tmp_path):
    from gpuflow.sync import RSYNC_DELTA_MIN_BYTES

    target = make_target(sshd_session, tmp_path / "kh")
    destination = SSHDestination(target, str(tmp_path / "remote"))
    weights = project / "weights.bin"
    weights.write_bytes(os.urandom(RSYNC_DELTA_MIN_BYTES + 4096))

    first = sync_directory(project, destination)  # every file is new: no delta basis
    assert first.method == "tar" and first.files_sent == first.files_considered

    with weights.open("r+b") as handle:  # rewrite a few bytes of the big file
        handle.seek(1000)
        handle.write(b"fine-tuned")
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 1_000_000_000))
    second = sync_directory(project, destination)
    assert (second.method, second.sent) == ("delta", ("weights.bin",))  # block delta: sync/blockdelta.py
    assert (tmp_path / "remote" / "weights.bin").read_bytes() == weights.read_bytes()

    (project / "train.py").write_text("print('edited')\n")  # a small edit: not worth a second session
    os.utime(project / "train.py", ns=(0, time.time_ns() + 2_000_000_000))
    third = sync_directory(project, destination)
    assert (third.method, third.sent) == ("tar", ("train.py",))


def test_rsync_is_refused_when_the_remote_lacks_it(project, sshd_session, tmp_path, monkeypatch):
    from gpuflow.errors import UsageError
    from gpuflow.sync import exchange

    target = make_target(sshd_session, tmp_path / "kh")
    monkeypatch.setattr(exchange, "EXCHANGE_SCRIPT", exchange.EXCHANGE_SCRIPT.replace("command -v rsync", "false"))

    with pytest.raises(UsageError, match="rsync on the target"):
        sync_directory(project, SSHDestination(target, str(tmp_path / "remote")), method="rsync")


def test_tar_is_used_when_the_remote_has_no_rsync(project, sshd_session, tmp_path, monkeypatch):
    from gpuflow.sync import RSYNC_DELTA_MIN_BYTES, exchange

    target = make_target(sshd_session, tmp_path / "kh")
    destination = SSHDestination(target, str(tmp_path / "remote"))
    weights = project / "weights.bin"
    weights.write_bytes(os.urandom(RSYNC_DELTA_MIN_BYTES + 1))
    sync_directory(project, destination)
    weights.write_bytes(os.urandom(RSYNC_DELTA_MIN_BYTES + 1))  # rsync would be chosen ...
    monkeypatch.setattr(exchange, "EXCHANGE_SCRIPT", exchange.EXCHANGE_SCRIPT.replace("command -v rsync", "false"))

    report = sync_directory(project, destination)  # ... but the remote has none

    assert (report.method, report.sent) == ("tar", ("weights.bin",))
    assert (tmp_path / "remote" / "weights.bin").read_bytes() == weights.read_bytes()


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


def test_a_file_vanishing_mid_sync_fails_cleanly_and_the_next_sync_repairs(project, make_destination, monkeypatch):
    from gpuflow.errors import DataError
    from gpuflow.sync import engine as sync_module

    destination, remote, method = make_destination("tar")
    real_scan = sync_module.scan_tree

    def scan_then_delete(*args, **kwargs):
        tree = real_scan(*args, **kwargs)
        (project / "pkg" / "model.py").unlink()  # gone between the scan and the send
        return tree

    monkeypatch.setattr(sync_module, "scan_tree", scan_then_delete)
    with pytest.raises(DataError, match="model.py"):
        sync_directory(project, destination, method=method)
    monkeypatch.setattr(sync_module, "scan_tree", real_scan)

    report = sync_directory(project, destination, method=method)

    assert "pkg/model.py" not in report.sent
    assert (remote / "train.py").read_text() == (project / "train.py").read_text()
    assert not (remote / "pkg" / "model.py").exists()
