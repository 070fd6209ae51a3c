"""Empty directories of the project arrive (a training script may expect `checkpoints/`
to exist), ignore rules still decide, over every transport and through `gpuflow sync`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpuflow.cli import main
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from gpuflow.sync import sync_directory
from tests.sync.conftest import write

pytestmark = pytest.mark.ssh


def _directories(root: Path) -> set[str]:
    return {
        os.path.relpath(os.path.join(directory, name), root)
        for directory, names, _ in os.walk(root)
        for name in names
        if not os.path.islink(os.path.join(directory, name))
    }


@pytest.fixture
def with_empty_directories(project: Path) -> Path:
    write(project / ".gitignore", "build/\n*.log\n")
    for name in ("checkpoints", "data/raw", "dir with space/-x", "build", "pkg/__pycache__", "runs"):
        (project / name).mkdir(parents=True)
    write(project / "logs" / "train.log", "ignored, but its directory is not")
    return project


def test_empty_directories_arrive_and_ignored_ones_do_not(with_empty_directories, make_destination, destination_kind):
    project = with_empty_directories
    destination, remote, method = make_destination(destination_kind)

    report = sync_directory(project, destination, method=method, skip_top_level=("runs",))

    arrived = _directories(remote)
    assert {"checkpoints", "data", "data/raw", "dir with space/-x", "logs"} <= arrived
    assert not {"build", "pkg/__pycache__", "runs"} & arrived
    assert not (remote / "logs" / "train.log").exists()
    assert set(report.created) == {"checkpoints", "data", "data/raw", "dir with space/-x", "logs"}
    assert report.to_dict()["directories_created"] == 5 and "created 5 empty directories" in report.summary()

    again = sync_directory(project, destination, method=method, skip_top_level=("runs",))
    assert (again.files_sent, again.directories_created, again.files_deleted) == (0, 0, 0)
    assert "empty director" not in again.summary()

    (project / "data" / "raw").rmdir()  # gone here: gone there
    third = sync_directory(project, destination, method=method, skip_top_level=("runs",))
    assert third.deleted == ("data/raw",) and not (remote / "data" / "raw").exists()
    assert (remote / "data").is_dir()


def test_a_destination_file_in_the_way_of_an_empty_directory_is_replaced(project, make_destination, destination_kind):
    destination, remote, method = make_destination(destination_kind)
    write(remote / "checkpoints", "a file where the project now has a directory")
    (project / "checkpoints").mkdir()

    report = sync_directory(project, destination, method=method)

    assert report.deleted == ("checkpoints",) and report.created == ("checkpoints",)
    assert (remote / "checkpoints").is_dir() and not list((remote / "checkpoints").iterdir())


def test_a_dry_run_lists_the_directories_it_would_create(project, make_destination, destination_kind):
    (project / "checkpoints").mkdir()
    destination, remote, method = make_destination(destination_kind)

    report = sync_directory(project, destination, method=method, dry_run=True)

    assert report.created == ("checkpoints",) and "would create 1 empty directory" in report.summary()
    assert not remote.exists()


def test_gpuflow_sync_to_a_sandbox_cluster_creates_them(project, gpuflow_home, monkeypatch, capsys):
    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678",
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),), sandbox=True,
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    write(project / "pyproject.toml", "[project]\nname = 'demo'\n")
    (project / "checkpoints").mkdir()
    monkeypatch.chdir(project)

    with pytest.raises(SystemExit) as dry:
        main(["sync", "box", "--dry-run"])
    assert dry.value.code == 0 and "  mkdir   checkpoints/\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["sync", "box", "--json"])
    assert done.value.code == 0 and json.loads(capsys.readouterr().out)["created"] == ["checkpoints"]
    assert (gpuflow_home / "sandbox" / "box" / "i-0123456789abcdef0" / "project" / "checkpoints").is_dir()
