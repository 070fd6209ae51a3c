"""The tar stream compressed when it pays: the decision, and compressed syncs landing byte for byte."""

from __future__ import annotations

import os
import random

import pytest

from gpuflow.errors import DataError
from gpuflow.sync import SSHDestination, scan_source, sync_directory
from gpuflow.sync.compress import SAMPLE_FROM_BYTES, on_this_machine, worth_compressing
from tests.sync.conftest import HOSTILE_NAMES, make_target, write


def _text(size: int, seed: int = 0) -> str:
    words = random.Random(seed).choices(["layer", "dense", "epoch", "batch", "loss", "adam"], k=size // 5 + 1)
    return " ".join(words)[:size]


def test_small_source_files_compress(project):
    tree = scan_source(project)
    assert worth_compressing(project, tree.entries)


def test_already_compressed_or_random_data_does_not(tmp_path):
    root = tmp_path / "tree"
    write(root / "train.py", "print(1)\n")
    write(root / "weights.npz", _text(3 * SAMPLE_FROM_BYTES))  # compressible bytes, but the name says zip
    assert not worth_compressing(root, scan_source(root).entries)

    other = tmp_path / "random"
    write(other / "train.py", "print(1)\n")
    write(other / "blob.bin", os.urandom(SAMPLE_FROM_BYTES + 1))  # no telling name: the sample decides
    assert not worth_compressing(other, scan_source(other).entries)

    (other / "blob.bin").write_text(_text(SAMPLE_FROM_BYTES + 1))
    assert worth_compressing(other, scan_source(other).entries)


def test_only_a_remote_link_is_worth_it():
    assert on_this_machine("127.0.0.1") and on_this_machine("::1") and on_this_machine("localhost")
    assert not on_this_machine("203.0.113.7") and not on_this_machine("ec2-1-2-3-4.compute.amazonaws.com")


def _signature(root):
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            status = os.lstat(path)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = (handle.read(), status.st_mtime_ns, status.st_mode & 0o7777)
    return found


@pytest.mark.ssh
def test_a_compressed_sync_lands_byte_for_byte_and_the_next_sends_nothing(project, sshd_session, tmp_path):
    target = make_target(sshd_session, tmp_path / "kh")
    remote = tmp_path / "remote"
    destination = SSHDestination(target, str(remote))
    write(project / "big.txt", _text(SAMPLE_FROM_BYTES * 2, seed=3))  # several deflate blocks
    os.chmod(project / "train.py", 0o750)
    os.utime(project / "train.py", ns=(0, 1_700_000_000_123_456_789))

    first = sync_directory(project, destination, compress=True)

    assert first.compressed and first.method == "tar" and "(gzip)" in first.summary()
    assert _signature(remote) == _signature(project)
    assert all((remote / name).exists() for name in HOSTILE_NAMES)
    again = sync_directory(project, destination, compress=True)
    assert again.sent == () and not again.compressed


@pytest.mark.ssh
def test_to_a_loopback_sshd_auto_sends_plain_tar(project, sshd_session, tmp_path):
    target = make_target(sshd_session, tmp_path / "kh")
    report = sync_directory(project, SSHDestination(target, str(tmp_path / "remote")))
    assert report.method == "tar" and not report.compressed
    assert _signature(tmp_path / "remote") == _signature(project)


@pytest.mark.ssh
def test_without_gzip_on_the_destination_the_stream_stays_plain(project, sshd_session, tmp_path, monkeypatch):
    from gpuflow.sync import exchange

    monkeypatch.setattr(exchange, "EXCHANGE_SCRIPT", exchange.EXCHANGE_SCRIPT.replace("command -v gzip", "false"))
    target = make_target(sshd_session, tmp_path / "kh")

    report = sync_directory(project, SSHDestination(target, str(tmp_path / "remote")), compress=True)

    assert not report.compressed
    assert _signature(tmp_path / "remote") == _signature(project)


@pytest.mark.ssh
def test_a_file_vanishing_mid_compressed_stream_places_nothing_partial(project, sshd_session, tmp_path, monkeypatch):
    from gpuflow.sync import engine

    target = make_target(sshd_session, tmp_path / "kh")
    remote = tmp_path / "remote"
    real_scan = engine.scan_tree

    def scan_then_delete(*args, **kwargs):
        tree = real_scan(*args, **kwargs)
        (project / "train.py").unlink()  # gone between the scan and the send
        return tree

    monkeypatch.setattr(engine, "scan_tree", scan_then_delete)
    with pytest.raises(DataError, match="train.py"):
        sync_directory(project, SSHDestination(target, str(remote)), compress=True)
    monkeypatch.setattr(engine, "scan_tree", real_scan)

    local = _signature(project)
    placed = _signature(remote) if remote.exists() else {}
    assert all(placed[path][0] == local[path][0] for path in placed)  # whatever arrived is whole
    report = sync_directory(project, SSHDestination(target, str(remote)), compress=True)
    assert report.compressed and _signature(remote) == _signature(project)
