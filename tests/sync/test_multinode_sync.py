"""Syncing one tree to several nodes: one local scan, one transfer per node, every node ends identical."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from gpuflow.errors import UsageError
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.sync import LocalDestination, SharedScans, scan_source, sync_directory, sync_many
from gpuflow.sync import engine as sync_engine
from tests.sync.conftest import write


def _signature(root) -> dict[str, tuple[bytes, int, int]]:
    """path -> (content, mtime_ns, mode) of every file, (target, 0, 0) of every link under ``root``."""
    found = {}
    for directory, directories, files in os.walk(root):
        for name in files + [d for d in directories if os.path.islink(os.path.join(directory, d))]:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = (os.readlink(path).encode(), 0, 0)
                continue
            status = os.lstat(path)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = (handle.read(), status.st_mtime_ns, status.st_mode & 0o7777)
    return found


@pytest.fixture
def count_scans(monkeypatch):
    """How many times the engine walked a local tree."""
    calls = []
    real = sync_engine.scan_tree

    def counting(root, **options):
        calls.append(str(root))
        return real(root, **options)

    monkeypatch.setattr(sync_engine, "scan_tree", counting)
    return calls


@pytest.mark.ssh
def test_one_scan_for_n_nodes_and_every_node_ends_identical(project, make_destination, tmp_path, count_scans):
    write(project / ".gitignore", "*.log\n")
    write(project / "debug.log", "ignored")
    os.symlink("train.py", project / "link-to-train")
    ssh_fresh, ssh_fresh_dir, _ = make_destination("tar", "node1/project")
    ssh_stale, ssh_stale_dir, _ = make_destination("tar", "node2/project")
    local_fresh = LocalDestination(tmp_path / "node3" / "project")
    # node 2 holds last run's copy: an edited file, a file the tree no longer has, an ignored leftover
    shutil.copytree(project, ssh_stale_dir, symlinks=True, ignore=shutil.ignore_patterns("debug.log"))
    write(ssh_stale_dir / "train.py", "print('old')\n")
    write(ssh_stale_dir / "gone.py", "x = 1\n")
    write(ssh_stale_dir / "server.log", "kept: ignored")

    reports = sync_many(project, [ssh_fresh, ssh_stale, local_fresh])

    assert count_scans == [str(project)]  # one walk of the tree for the three nodes
    expected = {path: value for path, value in _signature(project).items() if path != "debug.log"}
    assert _signature(ssh_fresh_dir) == expected
    assert _signature(local_fresh.directory) == expected
    assert _signature(ssh_stale_dir) == {**expected, "server.log": _signature(ssh_stale_dir)["server.log"]}
    assert not (ssh_stale_dir / "gone.py").exists()
    # each node got its own plan: the fresh ones everything, the stale one its difference
    assert reports[0].files_sent == reports[2].files_sent == len(expected)
    assert reports[1].deleted == ("gone.py",) and reports[1].sent == ("train.py",)
    assert [report.destination for report in reports] == [
        ssh_fresh.describe(), ssh_stale.describe(), local_fresh.describe()
    ]


def test_a_failing_node_is_raised_after_the_others_finish(project, tmp_path, count_scans):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where node 1's directory should be")
    good = LocalDestination(tmp_path / "good" / "project")

    with pytest.raises(OSError):
        sync_many(project, [LocalDestination(blocked / "project"), good])

    assert count_scans == [str(project)]
    assert (good.directory / "train.py").read_text() == "print('train')\n"


def test_a_tree_scanned_from_another_source_is_refused(project, tmp_path):
    other = tmp_path / "other"
    write(other / "a.py", "a = 1\n")

    with pytest.raises(UsageError, match="scanned tree"):
        sync_directory(project, LocalDestination(tmp_path / "dest"), tree=scan_source(other))
    assert not (tmp_path / "dest").exists()


def test_overlapping_syncs_share_a_scan_and_a_later_one_rescans(project, tmp_path, count_scans):
    scans = SharedScans()
    both_listed = threading.Barrier(2)
    results = {}

    def node(index: int) -> None:
        # the two syncs overlap: each waits inside the shared hold until the other holds it too
        key = scans.key(project, ())
        with scans.hold(key, lambda: scan_source(project)) as tree:
            both_listed.wait(timeout=30)
            results[index] = sync_directory(project, LocalDestination(tmp_path / f"n{index}"), tree=tree())

    threads = [threading.Thread(target=node, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert count_scans == [str(project)] and scans.scans == 1
    assert results[0].files_sent == results[1].files_sent > 0

    write(project / "new.py", "added after the first syncs\n")
    report = sync_directory(project, LocalDestination(tmp_path / "n0"), scans=scans)

    assert len(count_scans) == 2  # nothing overlaps it any more: a fresh scan, which sees the new file
    assert report.sent == ("new.py",)


def test_a_multinode_runs_node_syncs_share_one_scan(project, gpuflow_home, count_scans, monkeypatch):
    """The node syncs a run on several nodes calls (gpuflow.jobs.targets), in parallel as its launcher runs them."""
    from contextlib import contextmanager

    from gpuflow.jobs.targets import target_for_cluster

    all_holding = threading.Barrier(3)
    real_hold = SharedScans.hold

    @contextmanager
    def hold_then_meet(self, key, scan):
        with real_hold(self, key, scan) as tree:
            all_holding.wait(timeout=30)  # the three node syncs overlap, as parallel transfers do
            yield tree

    monkeypatch.setattr(SharedScans, "hold", hold_then_meet)

    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678", sandbox=True,
        nodes=tuple(Node(f"i-000000000000000{i}", "running", public_ip="127.0.0.1") for i in range(3)),
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    target = target_for_cluster("box", project_dir=project)
    reports = {}

    def node(index: int) -> None:
        reports[index] = target.nodes[index].sync_project(project)

    threads = [threading.Thread(target=node, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(reports) == [0, 1, 2]
    expected = _signature(project)
    for index in range(3):
        assert _signature(gpuflow_home / "sandbox" / "box" / f"i-000000000000000{index}" / "project") == expected
    assert count_scans == [str(project)] and all(report.files_sent == len(expected) for report in reports.values())
