"""`gpuflow sync` end to end: a sandbox cluster record, the CLI, the destination."""

from __future__ import annotations

import json
import os
import time

import pytest

from gpuflow.cli import main
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from tests.sync.conftest import HOSTILE_NAMES, write

pytestmark = pytest.mark.ssh


def _gpuflow(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


@pytest.fixture
def sandbox_cluster(gpuflow_home):
    """A sandbox cluster as `gpuflow up --sandbox` records it (no cloud call needed to sync)."""
    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678",
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),), sandbox=True,
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    return gpuflow_home / "sandbox" / "box" / "i-0123456789abcdef0"


@pytest.fixture
def in_project(project, monkeypatch):
    write(project / "pyproject.toml", "[project]\nname = 'demo'\n")
    write(project / ".gitignore", "*.log\n")
    write(project / "debug.log", "noise")
    write(project / "runs" / "old-run" / "metrics.json", "{}")
    monkeypatch.chdir(project / "pkg")  # the project root is found from a subdirectory
    return project


def test_sync_to_a_sandbox_cluster_over_the_local_transport(in_project, sandbox_cluster, capsys):
    assert _gpuflow("sync", "--json") == 0  # the only cluster is the default

    report = json.loads(capsys.readouterr().out)
    remote = sandbox_cluster / "project"
    assert report["method"] == "copy" and report["files_sent"] == len(HOSTILE_NAMES) + 5
    assert report["destination"] == str(remote)
    assert (remote / "pkg" / "model.py").read_text() == "LAYERS = 3\n"
    assert not (remote / "debug.log").exists() and not (remote / "runs").exists()

    assert _gpuflow("sync", "box") == 0
    assert capsys.readouterr().out.startswith(f"sent 0 of {len(HOSTILE_NAMES) + 5} files")


def test_sync_data_lands_in_a_stable_place(in_project, sandbox_cluster, tmp_path, capsys):
    data = write(tmp_path / "digits" / "train.npz", b"\x00" * 1000).parent

    assert _gpuflow("sync", "box", "--data", str(data), "--json") == 0

    report = json.loads(capsys.readouterr().out)
    assert report["files_sent"] == 1 and report["bytes_sent"] == 1000
    assert (sandbox_cluster / "data" / "digits" / "train.npz").stat().st_size == 1000


def test_dry_run_lists_and_changes_nothing(in_project, sandbox_cluster, capsys):
    assert _gpuflow("sync", "box", "--dry-run") == 0

    output = capsys.readouterr().out
    assert output.startswith("would send")
    assert "  send    train.py" in output and "  send    'new\\nline.txt'" in output
    assert not (sandbox_cluster / "project").exists()


def test_sync_through_the_sandbox_sshd(in_project, sandbox_cluster, sshd_session, monkeypatch, capsys):
    monkeypatch.setenv(
        "GPUFLOW_SANDBOX_SSH",
        f"host=127.0.0.1,port={sshd_session.port},user={sshd_session.user},key={sshd_session.client_key},"
        f"host_key={sshd_session.directory / 'ssh_host_ed25519_key.pub'}",
    )

    assert _gpuflow("sync", "box", "--json") == 0

    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "tar" and report["files_sent"] == len(HOSTILE_NAMES) + 5
    for name in HOSTILE_NAMES:
        assert (sandbox_cluster / "project" / name).read_text() == f"content of {name!r}\n"

    (in_project / "train.py").write_text("print('v2')\n")
    os.utime(in_project / "train.py", ns=(0, time.time_ns() + 2_000_000_000))
    assert _gpuflow("sync", "box", "--method", "rsync", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["method"], report["sent"]) == ("rsync", ["train.py"])
    assert (sandbox_cluster / "project" / "train.py").read_text() == "print('v2')\n"


def test_a_changed_host_key_is_one_line_and_exit_code_7(in_project, sandbox_cluster, sshd, monkeypatch, capsys,
                                                        gpuflow_home):
    monkeypatch.setenv(
        "GPUFLOW_SANDBOX_SSH",
        f"host=127.0.0.1,port={sshd.port},user={sshd.user},key={sshd.client_key},"
        f"host_key={sshd.directory / 'ssh_host_ed25519_key.pub'}",
    )
    assert _gpuflow("sync", "box") == 0
    capsys.readouterr()
    # The server changes its key, but the configuration still names the old one: refuse.
    old_key = (sshd.directory / "ssh_host_ed25519_key.pub").read_text()
    (gpuflow_home / "old_host_key.pub").write_text(old_key)
    monkeypatch.setenv(
        "GPUFLOW_SANDBOX_SSH",
        f"host=127.0.0.1,port={sshd.port},user={sshd.user},key={sshd.client_key},"
        f"host_key={gpuflow_home / 'old_host_key.pub'}",
    )
    port = sshd.port
    sshd.stop()
    sshd.regenerate_host_key()
    sshd.start(port=port)

    assert _gpuflow("sync", "box") == 7

    error = capsys.readouterr().err
    assert error.startswith("gpuflow: error: host key of 127.0.0.1") and error.count("\n") == 1


def test_unknown_cluster_and_bad_data_name(in_project, sandbox_cluster, tmp_path, capsys):
    assert _gpuflow("sync", "nope") == 4
    assert capsys.readouterr().err.startswith("gpuflow: error: no cluster named 'nope'")
    bad = tmp_path / "my data"
    bad.mkdir()
    assert _gpuflow("sync", "box", "--data", str(bad)) == 2
    assert "invalid data directory name 'my data'" in capsys.readouterr().err
    assert _gpuflow("sync", "box", "--data", str(tmp_path / "missing")) == 2
    assert "not a directory" in capsys.readouterr().err


def test_large_tree_thresholds_come_from_the_project_config(in_project, sandbox_cluster, capsys):
    write(in_project / "pyproject.toml", "[project]\nname = 'demo'\n\n[tool.gpuflow]\nsync-warn-files = 5\n")

    assert _gpuflow("sync", "box") == 0  # not a terminal: warn and go on

    captured = capsys.readouterr()
    assert captured.err.startswith("gpuflow: warning: about to send 17 files")
    assert captured.out.startswith("sent 17 of 17 files")
    assert _gpuflow("sync", "box", "--yes") == 0  # nothing left to send: no warning either
    assert capsys.readouterr().err == ""
