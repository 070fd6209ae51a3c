"""Block delta (gpuflow/sync/blockdelta.py): a large file held at both ends is rewritten from its changed blocks.

Against the loopback OpenSSH server; small files (a few blocks of 64 KiB) stand in for a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpuflow.errors import DataError
from gpuflow.sync import SSHDestination, blockdelta, engine, sync_directory
from gpuflow.sync.ignore import scan_tree
from gpuflow.sync.session import SshSession
from tests.sync.conftest import make_target

pytestmark = pytest.mark.ssh

BLOCK = 64 << 10
NAME = "dir with space/we\nights $(touch PWNED).bin"


@pytest.fixture
def pair(tmp_path, sshd_session):
    """(source root, destination root, session): one 8-block file at both ends, the same bytes."""
    source, remote = tmp_path / "source", tmp_path / "remote"
    data = os.urandom(8 * BLOCK)
    for root in (source, remote):
        (root / NAME).parent.mkdir(parents=True)
        (root / NAME).write_bytes(data)
    session = SshSession(make_target(sshd_session, tmp_path / "known_hosts"))
    yield source, remote, session
    session.close()


def _entry(source: Path):
    (entry,) = [entry for entry in scan_tree(source).entries if entry.path == NAME]
    return entry


def _send(pair, **options):
    source, remote, session = pair
    return blockdelta.send_block_deltas(session, source, str(remote), [_entry(source)], block_size=BLOCK, **options)


def _leftovers(remote: Path) -> list[str]:
    return [name for name in os.listdir(remote / "dir with space") if name.startswith(".gpuflow-delta-")]


def _rewrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def test_a_changed_block_in_the_middle_is_all_that_travels(pair):
    source, remote, _ = pair
    _rewrite(source / NAME, 4 * BLOCK + 100, b"fine-tuned")
    os.chmod(source / NAME, 0o640)
    os.utime(source / NAME, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    before = (remote / NAME).stat().st_ino

    outcome = _send(pair)

    assert outcome.placed == (NAME,) and outcome.fallback == ()
    assert outcome.block_bytes == BLOCK  # one block of eight
    assert outcome.wire_bytes < BLOCK + 1024  # the block, its index, the request and the header
    placed = (remote / NAME).stat()
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()
    assert (placed.st_mode & 0o7777, placed.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
    assert placed.st_ino != before  # a new file renamed into place, not the old one written in place
    assert _leftovers(remote) == []


@pytest.mark.parametrize(
    ("new_size", "most_sent"),
    [(10 * BLOCK + 123, 2 * BLOCK + 123), (3 * BLOCK + 77, 77), (0, 0)],
    ids=["grow", "shrink", "empty"],
)
def test_a_size_change_sends_the_new_tail_only(pair, new_size, most_sent):
    source, remote, _ = pair
    data = (source / NAME).read_bytes()
    (source / NAME).write_bytes((data + os.urandom(new_size))[:new_size])

    outcome = _send(pair)

    assert outcome.placed == (NAME,)
    assert outcome.block_bytes == most_sent
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()
    assert (remote / NAME).stat().st_mtime_ns == (source / NAME).stat().st_mtime_ns
    assert _leftovers(remote) == []


def test_an_insertion_is_left_to_the_caller_and_nothing_changes_there(pair):
    source, remote, _ = pair
    old = (remote / NAME).read_bytes()
    (source / NAME).write_bytes(b"inserted" + (source / NAME).read_bytes())

    outcome = _send(pair)

    assert outcome.placed == () and [entry.path for entry in outcome.fallback] == [NAME]
    assert outcome.block_bytes == 0
    assert (remote / NAME).read_bytes() == old
    assert _leftovers(remote) == []


def test_a_source_changing_during_the_sync_stops_it_and_keeps_the_old_file(pair, monkeypatch):
    source, remote, _ = pair
    old = (remote / NAME).read_bytes()
    _rewrite(source / NAME, 2 * BLOCK, b"edit")
    read_block = blockdelta._read_block

    def meanwhile(handle, offset, length):  # a writer changes the block between hashing and sending
        _rewrite(source / NAME, offset, b"again")
        return read_block(handle, offset, length)

    monkeypatch.setattr(blockdelta, "_read_block", meanwhile)

    with pytest.raises(DataError, match="changed while being sent") as caught:
        _send(pair)

    assert "sync again" in caught.value.one_line()
    assert (remote / NAME).read_bytes() == old
    assert _leftovers(remote) == []


def test_a_failure_mid_way_leaves_the_old_file(pair, monkeypatch):
    source, remote, _ = pair
    old = (remote / NAME).read_bytes()
    _rewrite(source / NAME, 1 * BLOCK, b"edit")
    _rewrite(source / NAME, 6 * BLOCK, b"edit")
    read_block = blockdelta._read_block
    calls = []

    def dies(handle, offset, length):  # the first block goes, then this side fails
        calls.append(offset)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return read_block(handle, offset, length)

    monkeypatch.setattr(blockdelta, "_read_block", dies)

    with pytest.raises(KeyboardInterrupt):
        _send(pair)

    assert (remote / NAME).read_bytes() == old
    assert _leftovers(remote) == []


def test_sync_uses_the_block_delta_then_falls_back_for_an_insertion(pair, monkeypatch):
    source, remote, session = pair
    monkeypatch.setattr(blockdelta, "BLOCK_SIZE", BLOCK)
    monkeypatch.setattr(blockdelta, "MIN_BASIS_BYTES", 4 * BLOCK)
    destination = SSHDestination(session.target, str(remote))
    (source / "train.py").write_text("print('new')\n")
    os.utime(source / NAME, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    _rewrite(source / NAME, 3 * BLOCK, b"edit")

    assert sync_directory(source, destination, dry_run=True).method == "delta"
    edited = sync_directory(source, destination)

    assert edited.method == "delta" and set(edited.sent) == {NAME, "train.py"}
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()
    assert (remote / "train.py").read_text() == "print('new')\n"  # the rest as before (tar)
    assert sync_directory(source, destination).files_sent == 0  # mode and mtime as the scan saw them

    (source / NAME).write_bytes(b"inserted" + (source / NAME).read_bytes())
    inserted = sync_directory(source, destination)  # shifted blocks: rsync's rolling delta
    assert (inserted.method, inserted.sent) == ("rsync", (NAME,))
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()

    monkeypatch.setattr(engine, "local_rsync_usable", lambda: False)
    (source / NAME).write_bytes(b"again" + (source / NAME).read_bytes())
    whole = sync_directory(source, destination)  # no rsync here: the file travels whole
    assert (whole.method, whole.sent) == ("tar", (NAME,))
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()
    assert _leftovers(remote) == []


def test_without_python3_there_the_file_goes_as_before(pair, monkeypatch):
    source, remote, session = pair
    monkeypatch.setattr(blockdelta, "BLOCK_SIZE", BLOCK)
    monkeypatch.setattr(blockdelta, "MIN_BASIS_BYTES", 4 * BLOCK)
    monkeypatch.setattr(blockdelta, "_LAUNCH", blockdelta._LAUNCH.replace("command -v", "false"))
    _rewrite(source / NAME, 3 * BLOCK, b"edit")
    os.utime(source / NAME, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))

    report = sync_directory(source, SSHDestination(session.target, str(remote)))

    assert (report.method, report.sent) == ("rsync", (NAME,))
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()


def test_the_block_list_kept_there_is_trusted_only_while_the_file_is_unchanged(pair):
    source, remote, _ = pair
    _rewrite(source / NAME, 2 * BLOCK, b"edit")
    assert _send(pair).block_bytes == BLOCK
    import hashlib

    kept = Path(f"{remote}.gpuflow-blocks") / hashlib.sha256(os.fsencode(NAME)).hexdigest()
    record = bytearray(kept.read_bytes())
    record[-8 * 32 : -7 * 32] = bytes(32)  # block 0's sha256, as if the file said otherwise
    kept.write_bytes(record)

    _rewrite(source / NAME, 5 * BLOCK, b"edit")
    used = _send(pair)  # the kept list stands for the unchanged file: block 0 looks changed too
    assert used.block_bytes == 2 * BLOCK
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()

    status = (remote / NAME).stat()
    _rewrite(remote / NAME, 7 * BLOCK, b"a job wrote here")  # same size, mtime put back: only ctime moves
    os.utime(remote / NAME, ns=(status.st_atime_ns, status.st_mtime_ns))
    _rewrite(source / NAME, 1 * BLOCK, b"edit")
    fresh = _send(pair)  # the list no longer stands for the file: hashed again, block 7 found and mended
    assert fresh.block_bytes == 2 * BLOCK
    assert (remote / NAME).read_bytes() == (source / NAME).read_bytes()
    assert _leftovers(remote) == []


def test_a_directory_swapped_for_a_link_there_is_not_followed(pair, tmp_path):
    source, remote, _ = pair
    outside = tmp_path / "outside"
    (remote / "dir with space").rename(outside)
    (remote / "dir with space").symlink_to(outside)  # planted after the listing: the helper must not go through
    before = (outside / NAME.split("/")[1]).read_bytes()
    _rewrite(source / NAME, 2 * BLOCK, b"edit")

    outcome = _send(pair)

    assert outcome.placed == () and [entry.path for entry in outcome.fallback] == [NAME]
    assert (outside / NAME.split("/")[1]).read_bytes() == before
    assert [name for name in os.listdir(outside) if name.startswith(".gpuflow-delta-")] == []
