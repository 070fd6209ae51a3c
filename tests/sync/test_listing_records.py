"""An unchanged file's listing record is matched whole (no parse); everything else still compares field by field."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from gpuflow.sync import DestinationState, plan_sync, scan_source
from gpuflow.sync import exchange
from gpuflow.sync.exchange import ListingParser, expected_records
from tests.sync.conftest import write

FIND_FORMAT = "%y\\0%m\\0%s\\0%T@\\0%l\\0%P\\0"


def _records(directory) -> list[bytes]:
    listing = subprocess.run(["find", ".", "-mindepth", "1", "-type", "f", "-printf", FIND_FORMAT], cwd=directory,
                             capture_output=True, check=True).stdout
    fields = listing.split(b"\0")[:-1]
    return [b"".join(field + b"\0" for field in fields[start:start + 6]) for start in range(0, len(fields), 6)]


def test_every_unchanged_file_is_found_by_its_whole_record(project, tmp_path):
    write(project / "caf\u00e9 \udcff.py", "x")  # not UTF-8 on disk
    os.chmod(project / "train.py", 0o4755)
    remote = tmp_path / "remote"
    shutil.copytree(project, remote, symlinks=True)
    tree = scan_source(project)

    expected = expected_records(tree)
    records = _records(remote)

    assert records and all(record in expected for record in records)
    assert {tree.entries[position].path for position in expected.values()} == {
        entry.path for entry in tree.entries if entry.kind == "file"}


@pytest.mark.parametrize("expect_from", [0, 10**6])  # whole records looked up from the first, or never
def test_a_record_not_found_whole_is_still_compared(project, tmp_path, monkeypatch, expect_from):
    monkeypatch.setattr(exchange, "_EXPECT_FROM_RECORDS", expect_from)
    old = project / "pkg" / "model.py"
    os.utime(old, ns=(981_000_000_123_000_000, 981_000_000_123_000_000))  # 2001-02: outside the whole-record match
    remote = tmp_path / "remote"
    shutil.copytree(project, remote, symlinks=True)
    seconds_only = remote / "train.py"  # a destination keeping whole seconds
    mtime = os.lstat(project / "train.py").st_mtime_ns
    os.utime(seconds_only, ns=(mtime // 10**9 * 10**9,) * 2)
    tree = scan_source(project)
    listing = subprocess.run(["find", ".", "-mindepth", "1", "-printf", FIND_FORMAT], cwd=remote,
                             capture_output=True, check=True).stdout

    parser = ListingParser(tree)
    for start in range(0, len(listing), 13):
        parser.feed(listing[start:start + 13])
    state = DestinationState(exists=True, entries=parser.close(), unchanged=bytes(parser.unchanged))

    assert plan_sync(tree, state).to_send == ()
    assert all(entry.kind == "dir" for entry in state.entries.values())


def test_a_long_record_cut_by_every_chunk_parses(tmp_path, monkeypatch):
    monkeypatch.setattr(exchange, "_EXPECT_FROM_RECORDS", 0)
    long_name = "d" * 200 + "/" + "f" * 250
    (tmp_path / "src" / ("d" * 200)).mkdir(parents=True)
    write(tmp_path / "src" / long_name, "x")
    remote = tmp_path / "remote"
    shutil.copytree(tmp_path / "src", remote)
    write(remote / long_name, "changed, longer")
    tree = scan_source(tmp_path / "src")
    listing = subprocess.run(["find", ".", "-mindepth", "1", "-printf", FIND_FORMAT], cwd=remote,
                             capture_output=True, check=True).stdout

    parser = ListingParser(tree)
    for start in range(0, len(listing), 3):
        parser.feed(listing[start:start + 3])
    entries = parser.close()

    assert entries[long_name].size == len("changed, longer")
    assert [entry.path for entry in plan_sync(tree, DestinationState(True, entries,
                                                                     unchanged=bytes(parser.unchanged))).to_send] == [long_name]
