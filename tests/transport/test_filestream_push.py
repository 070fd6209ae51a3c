"""A first pull has nothing local to compare with: the streamer sends every listed file
right after its listing (``--push-session``), so the bytes flow while the receiver plans.
What was not asked for is read past and never written; the checks are the same."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from gpuflow import jobs
from gpuflow.transport import filestream
from gpuflow.transport.ssh import SSHRunner
from tests.transport.conftest import target_for


def _tree(root):
    for relative in ("outputs/a/x.bin", "outputs/b/y.bin", "outputs/top.bin", "log.txt"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode() * 100)
    (root / "secret").write_bytes(b"outside")
    (root / "outputs" / "link").symlink_to(root / "secret")


def _push_session(root, names):
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", filestream.STREAMER_PY, str(root), "--push-session", *names],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )

    def send(data: bytes) -> None:
        process.stdin.write(data)
        process.stdin.flush()

    return process, filestream.Session(send, process.stdout.read1, pushed=True)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pushed_files_are_taken_as_asked_and_the_rest_read_past(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "local"
    _tree(remote)
    local.mkdir()
    process, session = _push_session(remote, ["outputs", "log.txt"])
    assert session.pushed
    # Asked in another order than listed; outputs/a/x.bin not asked (pushed, read past); the
    # link is not a file (never pushed): asked for after the push, and refused.
    wanted = ["log.txt", "outputs/top.bin", "outputs/b/y.bin", "outputs/link"]
    items = [(relative, str(local / f"{index}.part")) for index, relative in enumerate(wanted)]
    results = {fetched.relative: fetched for fetched in session.fetch(items)}
    assert set(results) == set(wanted) and not session.pushed
    for relative, part in items[:3]:
        assert results[relative].sha256 == _digest(remote / relative) == hashlib.sha256(open(part, "rb").read()).hexdigest()
    assert results["outputs/link"].sha256 is None and not os.path.exists(items[3][1])
    assert sorted(os.listdir(local)) == ["0.part", "1.part", "2.part"]  # nothing else written
    # The same session answers requests after the push.
    assert session.hashes(["outputs/a/x.bin"]) == {"outputs/a/x.bin": _digest(remote / "outputs/a/x.bin")}
    process.stdin.close()
    assert process.stdout.read() == b"" and process.wait() == 0


def test_a_file_rewritten_while_the_push_runs_is_flagged(tmp_path):
    remote = tmp_path / "remote"
    (remote / "outputs").mkdir(parents=True)
    (remote / "outputs" / "a-first.bin").write_bytes(os.urandom(4 << 20))  # fills the pipe: the streamer waits
    (remote / "outputs" / "b-ckpt.bin").write_bytes(b"epoch 1")
    process, session = _push_session(remote, ["outputs"])
    (remote / "outputs" / "b-ckpt.bin").write_bytes(b"epoch 2, longer")  # rewritten before the streamer reads it
    items = [(name, str(tmp_path / f"{index}.part")) for index, name in enumerate(["outputs/a-first.bin", "outputs/b-ckpt.bin"])]
    first, second = session.fetch(items)
    assert first.sha256 == _digest(remote / "outputs" / "a-first.bin")
    assert second.sha256 is None and "changed" in second.reason
    process.stdin.close()
    assert process.wait() == 0


def test_a_pull_never_written_to_takes_every_file_from_the_push(tmp_path, sshd_session, pinned_known_hosts, monkeypatch):
    remote, local = tmp_path / "run", tmp_path / "local"
    for index in range(12):
        path = remote / "outputs" / f"d{index % 3}" / f"f{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {index}\n" * 20)
    (remote / "job.log").write_text("log\n")
    asked = []
    original = filestream.Session._ask
    monkeypatch.setattr(filestream.Session, "_ask", lambda self, op, rel: asked.append(op) or original(self, op, rel))
    with SSHRunner(target_for(sshd_session, pinned_known_hosts), base_dir=str(tmp_path / "base")) as runner:
        first = jobs.pull_files(runner, str(remote), local)
        assert asked == []  # no request at all: every file came with the listing
        (remote / "outputs" / "d0" / "f3.txt").write_text("changed\n")
        second = jobs.pull_files(runner, str(remote), local)
    assert len(first.fetched) == 13 and not first.changing and not first.refused
    assert asked == [b"H", b"F"] and second.fetched == ("outputs/d0/f3.txt",)  # held files compared, not pushed
    for path in [*remote.rglob("*.txt"), remote / "job.log"]:
        assert (local / path.relative_to(remote)).read_bytes() == path.read_bytes()
    assert not list(local.rglob("*.gpuflow-part"))
