"""Every input a user writes that `gpuflow sync` reads (ignore files, the project
config) is reported in one line naming the file and the line, exit 2, nothing sent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuflow.cli import main
from gpuflow.records import Cluster, Node
from gpuflow.state import StateStore
from tests.sync.conftest import write

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def box(gpuflow_home):
    """A sandbox cluster record: sync copies into a directory, no cloud call."""
    cluster = Cluster(
        name="box", region="us-east-1", instance_type="g5.xlarge", ami="ami-12345678",
        nodes=(Node("i-0123456789abcdef0", "running", public_ip="127.0.0.1"),), sandbox=True,
    )
    StateStore(gpuflow_home, "clusters").put("box", {**cluster.to_dict(), "phase": "up"})
    return gpuflow_home / "sandbox" / "box" / "i-0123456789abcdef0" / "project"


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    write(root / "gpuflow.toml", 'region = "us-east-1"\n')
    write(root / "train.py", "print('train')\n")
    monkeypatch.chdir(root)
    return root


def _sync_error(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["sync", "box"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpuflow: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("name", "content", "line", "says"),
    [
        (".gitignore", "*.log\nfoo\\\n", 2, r"invalid pattern 'foo\': it ends with a lone '\'"),
        (".gitignore", "\\\n", 1, r"invalid pattern '\': it ends with a lone '\'"),
        (".gpuflowignore", "# comment\n\n[abc\n", 3, "invalid pattern '[abc': a '[' class is never closed"),
        (".gitignore", "ok\nx[[:word:]]\n", 2, "unknown character class [:word:]"),
        (".gitignore", "a\n*.l\xf6g\n", 2, "not UTF-8 text (byte 0xf6) (save the file as UTF-8)"),
    ],
)
def test_a_bad_ignore_file_names_its_file_and_line(project, box, capsys, name, content, line, says):
    path = write(project / name, content.encode("latin-1"))
    error = _sync_error(capsys)
    assert f"{path}:{line}: " in error and says in error
    assert not box.exists()  # nothing sent


def test_a_bad_nested_ignore_file_is_named_with_its_directory(project, box, capsys):
    path = write(project / "pkg" / ".gitignore", "ok\nbroken[\n")
    write(project / "pkg" / "model.py", "x")
    assert f"{path}:2: invalid pattern 'broken['" in _sync_error(capsys)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'region = "us-east-1"\nmax_hour = 1\n', "gpuflow.toml:2: unknown setting 'max_hour' (did you mean 'max_hours'?)"),
        (b'region = "eu-\xff"\n', "gpuflow.toml:1: not UTF-8 text (byte 0xff) (save the file as UTF-8)"),
        (b'region = "us-east-1"\ncount = [\n', "gpuflow.toml:2: not valid TOML: Invalid value at the end of the file"),
        (b'region = "us-east-1"\ncount = 1 2\n', "gpuflow.toml:2: not valid TOML: Expected newline"),
        (b'sync_warn_files = "many"\n', "gpuflow.toml:1: sync_warn_files must be of type int, got 'many'"),
    ],
)
def test_a_bad_project_config_names_its_file_and_line(project, box, capsys, content, says):
    (project / "gpuflow.toml").write_bytes(content)
    assert f"{project / says}" in _sync_error(capsys)
    assert not box.exists()


def test_a_misspelt_key_in_pyproject_is_an_error_too(project, box, capsys):
    (project / "gpuflow.toml").unlink()
    write(project / "pyproject.toml", "[project]\nname = 'demo'\n\n[tool.gpuflow]\nsync-warn-file = 5\n")
    error = _sync_error(capsys)
    assert f"{project / 'pyproject.toml'}:5: unknown setting 'sync-warn-file' in [tool.gpuflow]" in error
    assert "did you mean 'sync_warn_files'?" in error


def test_a_separate_process_prints_one_line_and_no_traceback(project, box, gpuflow_home):
    (project / "gpuflow.toml").write_bytes(b"\xfe\xff")
    completed = subprocess.run(
        [sys.executable, "-m", "gpuflow", "sync", "box", "--dry-run"],
        cwd=project, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPUFLOW_HOME": str(gpuflow_home)},
    )
    assert completed.returncode == 2
    assert completed.stderr == (
        f"gpuflow: error: {project / 'gpuflow.toml'}:1: not UTF-8 text (byte 0xfe) (save the file as UTF-8)\n"
    )


def test_a_byte_order_mark_in_an_ignore_file_is_skipped_as_git_does(project, box, capsys):
    write(project / ".gitignore", b"\xef\xbb\xbf*.log\n")
    write(project / "debug.log", "noise")
    assert main_exit(["sync", "box", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train.py" in out and "debug.log" not in out


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code
