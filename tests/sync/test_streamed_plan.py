"""The listing compared against the scanned tree as it streams: the same plan, nothing kept per unchanged file."""

from __future__ import annotations

import os
import shutil
import subprocess

from gpuflow.sync import DestinationState, plan_sync, scan_source
from gpuflow.sync.exchange import ListingParser
from tests.sync.conftest import write

FIND_FORMAT = "%y\\0%m\\0%s\\0%T@\\0%l\\0%P\\0"


def _listing(directory) -> bytes:
    return subprocess.run(["find", ".", "-mindepth", "1", "-printf", FIND_FORMAT], cwd=directory,
                          capture_output=True, check=True).stdout


def _state(listing: bytes, tree=None) -> DestinationState:
    parser = ListingParser(tree)
    for start in range(0, len(listing), 7):  # fed in small pieces: records cut anywhere
        parser.feed(listing[start:start + 7])
    entries = parser.close()
    unchanged = bytes(parser.unchanged) if parser.unchanged is not None else None
    return DestinationState(exists=True, entries=entries, unchanged=unchanged)


def test_streamed_comparison_plans_what_the_full_listing_plans(project, tmp_path):
    write(project / ".gitignore", "*.log\n")
    os.symlink("train.py", project / "alias")
    remote = tmp_path / "remote"
    shutil.copytree(project, remote, symlinks=True)
    write(remote / "train.py", "print('older')\n")  # differs
    os.chmod(remote / "pkg" / "model.py", 0o600)  # same bytes, other mode
    write(remote / "stale.py", "gone locally\n")  # to delete
    write(remote / "server.log", "ignored: stays")
    (remote / "alias").unlink()
    os.symlink("pkg/model.py", remote / "alias")  # a link to another target
    (remote / "pkg" / "data.csv").unlink()
    (remote / "pkg" / "data.csv").mkdir()  # a directory where the tree has a file
    tree = scan_source(project)
    listing = _listing(remote)

    full = plan_sync(tree, _state(listing))
    streamed_state = _state(listing, tree)
    streamed = plan_sync(tree, streamed_state)

    assert streamed == full
    assert {entry.path for entry in full.to_send} == {"train.py", "pkg/model.py", "alias", "pkg/data.csv"}
    assert "stale.py" in full.to_delete and "pkg/data.csv" in full.to_delete and "server.log" not in full.to_delete
    # the unchanged files are only marked: what is kept is what differs, the extras and the directories
    kept = set(streamed_state.entries)
    assert kept == {"train.py", "pkg/model.py", "alias", "pkg/data.csv", "stale.py", "server.log", "pkg",
                    "dir with space"}
    assert sum(streamed_state.unchanged) == len(tree.entries) - 4


def test_a_no_change_listing_keeps_no_file_entry(project, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(project, remote, symlinks=True)
    tree = scan_source(project)

    state = _state(_listing(remote), tree)

    assert all(entry.kind == "dir" for entry in state.entries.values())
    assert plan_sync(tree, state).to_send == () and plan_sync(tree, state).to_delete == ()
