"""A pull over SSH: every file in one stream, verified against the listing, placed atomically."""

from __future__ import annotations

from gpuflow import jobs
from gpuflow.transport.ssh import SSHRunner
from tests.transport.conftest import target_for


def test_pull_over_ssh_streams_verifies_and_skips_a_rewritten_file(tmp_path, sshd_session, monkeypatch):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd_session.known_hosts_line() + "\n")
    remote, local = tmp_path / "run", tmp_path / "local"
    for index in range(40):
        path = remote / "outputs" / f"d{index % 4}" / f"f{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {index}\n" * 50)
    (remote / "outputs" / "ckpt.bin").write_bytes(b"epoch 1")
    runner = SSHRunner(target_for(sshd_session, known_hosts), base_dir=str(tmp_path / "base"))
    try:
        entries = jobs.list_remote_tree(runner, str(remote), ("outputs",), hashed=True)
        (remote / "outputs" / "ckpt.bin").write_bytes(b"epoch 2")  # rewritten after the listing
        monkeypatch.setattr(SSHRunner, "get_file", lambda *a: (_ for _ in ()).throw(AssertionError("per-file get")))
        report = jobs.pull_files(runner, str(remote), local, entries=entries)
    finally:
        runner.close()
    assert report.changing == ("outputs/ckpt.bin",)
    assert not (local / "outputs" / "ckpt.bin").exists()
    assert len(report.fetched) == 40
    for index in range(40):
        relative = f"outputs/d{index % 4}/f{index}.txt"
        assert (local / relative).read_text() == (remote / relative).read_text()
    assert not list(local.rglob("*.gpuflow-part"))


def test_a_repeated_pull_over_ssh_hashes_only_what_is_held_and_fetches_only_what_changed(tmp_path, sshd_session):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd_session.known_hosts_line() + "\n")
    remote, local = tmp_path / "run", tmp_path / "local"
    (remote / "outputs").mkdir(parents=True)
    for index in range(5):
        (remote / "outputs" / f"f{index}.txt").write_text(f"file {index}\n")
    runner = SSHRunner(target_for(sshd_session, known_hosts), base_dir=str(tmp_path / "base"))
    try:
        first = jobs.pull_files(runner, str(remote), local)
        (remote / "outputs" / "f3.txt").write_text("changed on the instance\n")
        (remote / "outputs" / "new.txt").write_text("new\n")
        second = jobs.pull_files(runner, str(remote), local)
    finally:
        runner.close()
    assert len(first.fetched) == 5 and not first.unchanged
    assert sorted(second.fetched) == ["outputs/f3.txt", "outputs/new.txt"]
    assert len(second.unchanged) == 4 and not second.changing
    assert (local / "outputs" / "f3.txt").read_text() == "changed on the instance\n"
