"""One streamer for a whole pull: its listing, hashes and files in one remote process
(``STREAMER_PY ROOT --session NAME...``), and a pull over SSH that runs nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from gpuflow import jobs
from gpuflow.jobs import scripts
from gpuflow.transport import filestream
from gpuflow.transport.ssh import SSHRunner
from tests.transport.conftest import target_for


def _tree(root):
    for relative in ("outputs/a/x.bin", "outputs/a/b/c.bin", "outputs/b/y.bin", "outputs/top.bin", "log.txt"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode() * 100)
    (root / "outputs" / "empty").mkdir()
    (root / "secret").write_bytes(b"outside")
    (root / "outputs" / "link").symlink_to(root / "secret")
    (root / "outputs" / "linkdir").symlink_to(root / "outputs" / "a")
    os.mkfifo(root / "outputs" / "fifo")


class _Streamer:
    """The streamer as a local subprocess, in session mode."""

    def __init__(self, root, names):
        self.process = subprocess.Popen(
            [sys.executable, "-c", filestream.STREAMER_PY, str(root), "--session", *names],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def send(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def end(self) -> int:
        self.process.stdin.close()
        assert self.process.stdout.read() == b""  # nothing after the last answer
        return self.process.wait()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_session_lists_as_the_listing_script_hashes_and_streams_in_any_order(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "local"
    _tree(remote)
    local.mkdir()
    streamer = _Streamer(remote, ["outputs", "log.txt", "manifest.json"])
    session = filestream.Session(streamer.send, streamer.process.stdout.read1)
    # The same entries as the listing script's (without its hashes): one idea, two programs.
    listed = json.loads(subprocess.run(
        [sys.executable, "-c", scripts.LIST_TREE_PY, str(remote), "--hash-listed", "outputs", "log.txt", "manifest.json"],
        input=b"", stdout=subprocess.PIPE, check=True,
    ).stdout)
    assert session.listing == listed
    assert {entry["path"]: entry["kind"] for entry in session.listing}["outputs/link"] == "symlink"

    asked = ["outputs/a/x.bin", "outputs/link", "outputs/fifo", "outputs/linkdir/x.bin", "outputs/missing"]
    assert session.hashes(asked) == {"outputs/a/x.bin": _digest(remote / "outputs/a/x.bin")}
    # Directories revisited, a deeper one between, a top-level file after nested ones.
    wanted = ["outputs/a/x.bin", "outputs/b/y.bin", "outputs/a/b/c.bin", "outputs/a/x.bin", "log.txt",
              "outputs/top.bin", "outputs/linkdir/x.bin", "outputs/../secret", "outputs/a/b/c.bin"]
    items = [(relative, str(local / f"{index}.part")) for index, relative in enumerate(wanted)]
    results = list(session.fetch(items))
    assert [fetched.relative for fetched in results] == wanted
    for (relative, part), fetched in zip(items, results):
        if "link" in relative or ".." in relative:
            assert fetched.sha256 is None and fetched.reason and not os.path.exists(part)
        else:
            assert fetched.sha256 == _digest(remote / relative) == hashlib.sha256(open(part, "rb").read()).hexdigest()
    assert streamer.end() == 0


def test_a_file_rewritten_between_the_listing_and_its_read_is_flagged(tmp_path):
    remote = tmp_path / "remote"
    _tree(remote)
    streamer = _Streamer(remote, ["outputs"])
    session = filestream.Session(streamer.send, streamer.process.stdout.read1)
    path = remote / "outputs" / "top.bin"
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))  # same bytes, same size: rewritten
    [fetched] = session.fetch([("outputs/top.bin", str(tmp_path / "top.part"))])
    assert fetched.sha256 is None and "changed" in fetched.reason
    assert session.hashes(["outputs/top.bin", "outputs/b/y.bin"]) == {"outputs/b/y.bin": _digest(remote / "outputs/b/y.bin")}
    assert streamer.end() == 0


def test_a_session_on_a_missing_directory_lists_nothing_and_refuses(tmp_path):
    streamer = _Streamer(tmp_path / "gone", ["outputs"])
    session = filestream.Session(streamer.send, streamer.process.stdout.read1)
    assert session.listing == []
    [fetched] = session.fetch([("outputs/a", str(tmp_path / "a.part"))])
    assert fetched.sha256 is None and not (tmp_path / "a.part").exists()
    assert streamer.end() == 0


def test_a_pull_over_ssh_runs_one_remote_process_for_listing_hashes_and_files(tmp_path, sshd_session, pinned_known_hosts, monkeypatch):
    remote, local = tmp_path / "run", tmp_path / "local"
    for index in range(30):
        path = remote / "outputs" / f"d{index % 3}" / f"f{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {index}\n" * 20)
    (remote / "outputs" / "gone.txt").write_text("the job removes it\n")
    runner = SSHRunner(target_for(sshd_session, pinned_known_hosts), base_dir=str(tmp_path / "base"))
    started = []
    original = SSHRunner._start_streamer
    monkeypatch.setattr(SSHRunner, "_start_streamer", lambda self, arguments: started.append(arguments) or original(self, arguments))
    try:
        runner.connect()
        monkeypatch.setattr(SSHRunner, "run", lambda *a, **k: pytest.fail("a separate remote command"))
        monkeypatch.setattr(SSHRunner, "_sftp_client", lambda self: pytest.fail("no SFTP for a pull"))
        first = jobs.pull_files(runner, str(remote), local)
        (remote / "outputs" / "d1" / "f4.txt").write_text("changed on the instance\n")
        (remote / "outputs" / "gone.txt").unlink()
        second = jobs.pull_files(runner, str(remote), local)
    finally:
        runner.close()
    # One process per pull: the first (nothing here yet) has every file pushed after the listing.
    assert [arguments[1] for arguments in started] == ["--push-session", "--session"]
    assert len(first.fetched) == 31 and not first.unchanged
    assert second.fetched == ("outputs/d1/f4.txt",) and len(second.unchanged) == 29  # hashed in the same process
    assert (local / "outputs" / "d1" / "f4.txt").read_text() == "changed on the instance\n"
    assert not list(local.rglob("*.gpuflow-part"))
