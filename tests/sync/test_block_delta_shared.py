"""Within a command's shared connection (`gpuflow run`), the block delta rides on it like the rest of the sync."""

from __future__ import annotations

import os

import pytest

from gpuflow.sync import SSHDestination, blockdelta, sync_directory
from gpuflow.transport import shared
from tests.transport.test_shared_connections import _shared_runner, logins, server, target  # noqa: F401 - fixtures

pytestmark = pytest.mark.ssh


def test_the_block_delta_rides_on_the_shared_connection(target, server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(blockdelta, "BLOCK_SIZE", 16 << 10)
    monkeypatch.setattr(blockdelta, "MIN_BASIS_BYTES", 64 << 10)
    source, remote = tmp_path / "source", tmp_path / "instance" / "project"
    data = os.urandom(8 * (16 << 10))
    for root in (source, remote):
        (root / "sub dir").mkdir(parents=True)
        (root / "sub dir" / "it's.bin").write_bytes(data)
    with (source / "sub dir" / "it's.bin").open("r+b") as handle:
        handle.seek(5 * (16 << 10))
        handle.write(b"edit")
    os.utime(source / "sub dir" / "it's.bin", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    with shared.shared_connections():
        _shared_runner(target, tmp_path / "instance").run(["true"])
        report = sync_directory(source, SSHDestination(target, str(remote)))
    assert report.method == "delta"
    assert (remote / "sub dir" / "it's.bin").read_bytes() == (source / "sub dir" / "it's.bin").read_bytes()
    assert logins(server) == 1
