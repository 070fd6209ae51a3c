"""Many files in one stream: the remote streamer's frames, the receiver's checks,
and the SSH runner's ``fetch_files`` over one channel of its connection."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from gpuflow.errors import ConnectionLost, RemoteCommandFailed
from gpuflow.transport import filestream
from gpuflow.transport.local import LocalRunner
from gpuflow.transport.ssh import SSHRunner
from tests.transport.conftest import target_for


def _tree(root):
    (root / "outputs" / "deep").mkdir(parents=True)
    (root / "outputs" / "a.txt").write_bytes(b"alpha\n")
    (root / "outputs" / "deep" / "big.bin").write_bytes(os.urandom(3 << 20) + b"tail")  # several chunks
    (root / "outputs" / "empty").write_bytes(b"")
    (root / "secret.txt").write_bytes(b"not to be read through a link")
    (root / "outputs" / "link.txt").symlink_to(root / "secret.txt")
    (root / "linked").symlink_to(root / "outputs")
    os.mkfifo(root / "outputs" / "fifo")


ASKED = [
    "outputs/a.txt", "outputs/deep/big.bin", "outputs/empty", "outputs/link.txt", "linked/a.txt",
    "outputs/fifo", "outputs/missing", "outputs/../secret.txt", "outputs//a.txt",
]
DELIVERED = {"outputs/a.txt", "outputs/deep/big.bin", "outputs/empty"}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(results, remote, local):
    assert [fetched.relative for fetched in results] == ASKED  # in the order asked, one answer each
    for fetched in results:
        part = local / fetched.relative.replace("/", "_")
        if fetched.relative in DELIVERED:
            assert fetched.sha256 == _digest(remote / fetched.relative) == _digest(part)
        else:  # links (file or directory), a fifo, a missing file, `..`: refused, nothing written
            assert fetched.sha256 is None and fetched.reason, fetched
            assert not part.exists()


def test_streamer_sends_plain_files_and_refuses_links_specials_and_escapes(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    _tree(remote)
    process = subprocess.Popen(
        [sys.executable, "-c", filestream.STREAMER_PY, str(remote)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    process.stdin.write(filestream.request(ASKED))
    process.stdin.close()
    items = [(relative, str(local / relative.replace("/", "_"))) for relative in ASKED]
    results = list(filestream.receive(process.stdout.read1, items))
    assert process.wait() == 0
    _check(results, remote, local)


def test_a_cut_stream_is_an_error_and_leaves_no_partial_file(tmp_path):
    data = b"F" + (100).to_bytes(8, "big") + b"x" * 40
    pieces = [data, b""]
    with pytest.raises(filestream.StreamBroken):
        list(filestream.receive(lambda count: pieces.pop(0), [("a", str(tmp_path / "a.part"))]))
    assert not (tmp_path / "a.part").exists()


def test_a_planted_link_at_the_temporary_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "a.part").symlink_to(victim)
    body = b"new!"
    stream = b"F" + len(body).to_bytes(8, "big") + body + hashlib.sha256(body).digest() + b"\0Z"
    pieces = [stream, b""]
    [fetched] = filestream.receive(lambda count: pieces.pop(0), [("a", str(tmp_path / "a.part"))])
    assert fetched.sha256 == hashlib.sha256(body).hexdigest()
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "a.part").is_symlink() and (tmp_path / "a.part").read_bytes() == body


def test_ssh_runner_fetches_many_files_on_one_channel_without_sftp(tmp_path, sshd_session, pinned_known_hosts, monkeypatch):
    remote, local = tmp_path / "remote", tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    _tree(remote)
    runner = SSHRunner(target_for(sshd_session, pinned_known_hosts), base_dir=str(tmp_path / "base"))
    try:
        runner.connect()
        monkeypatch.setattr(SSHRunner, "_sftp_client", lambda self: pytest.fail("no SFTP for a pull"))
        items = [(relative, str(local / relative.replace("/", "_"))) for relative in ASKED]
        results = list(runner.fetch_files(str(remote), items))
        _check(results, remote, local)
        assert runner.connections_made == 1
        # The connection dies mid-stream: a clear, transient error; the next call reconnects.
        items = [("outputs/deep/big.bin", str(local / "again"))]
        stream = runner.fetch_files(str(remote), items * 20)
        next(stream)
        sshd_session.drop_sessions()
        with pytest.raises(ConnectionLost):
            list(stream)
        assert [fetched.sha256 for fetched in runner.fetch_files(str(remote), items)] == [
            _digest(remote / "outputs" / "deep" / "big.bin")
        ]
    finally:
        runner.close()


def test_local_runner_fetches_by_copy_and_refuses_links(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    _tree(remote)
    items = [(relative, str(local / relative.replace("/", "_"))) for relative in ASKED[:7]]
    results = list(LocalRunner(tmp_path / "base").fetch_files(str(remote), items))
    assert [fetched.relative for fetched in results] == ASKED[:7]
    assert {fetched.relative for fetched in results if fetched.sha256} == DELIVERED


def test_a_failing_streamer_is_a_remote_failure_not_a_lost_connection(tmp_path, sshd_session, pinned_known_hosts):
    runner = SSHRunner(target_for(sshd_session, pinned_known_hosts), base_dir=str(tmp_path / "base"))
    try:
        with pytest.raises(RemoteCommandFailed, match="No such file"):
            list(runner.fetch_files(str(tmp_path / "no such run"), [("a", str(tmp_path / "a.part"))]))
        assert runner.connections_made == 1
    finally:
        runner.close()
