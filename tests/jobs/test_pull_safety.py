"""`pull` can never write outside runs/<run-id>/, whatever the remote run directory holds."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from gpuflow import jobs
from gpuflow.errors import UnsafePath
from gpuflow.transport.local import LocalRunner
from tests.jobs.conftest import job_args

pytestmark = pytest.mark.ssh


def _finished_run(target, project):
    return jobs.run(target, project_dir=project, module=None, args=job_args(2), out=io.BytesIO())


def test_symlinks_in_the_remote_run_directory_are_refused(target, project, tmp_path):
    outcome = _finished_run(target, project)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("do not copy me")
    runner = target.connect()
    try:
        outputs = f"{outcome.record.remote_dir}/outputs"
        runner.run(["ln", "-s", str(secret), f"{outputs}/file-link"])
        runner.run(["ln", "-s", str(outside), f"{outputs}/dir-link"])
        runner.run(["ln", "-s", "../../../../..", f"{outputs}/up-link"])
        runner.put_bytes(b"fresh", f"{outputs}/fresh.txt")
    finally:
        runner.close()
    local = Path(outcome.record.local_dir)
    before_outside = sorted(path.name for path in outside.iterdir())

    with pytest.raises(UnsafePath) as caught:
        jobs.pull(outcome.record.run_id, resolve=lambda name: target)

    assert "file-link" in caught.value.message and "dir-link" in caught.value.message
    assert caught.value.exit_code == 7
    assert (local / "outputs" / "fresh.txt").read_text() == "fresh"  # the safe files still arrive
    for name in ("file-link", "dir-link", "up-link"):
        assert not os.path.lexists(local / "outputs" / name)
    assert sorted(path.name for path in outside.iterdir()) == before_outside


@pytest.mark.parametrize(
    "hostile_path",
    ["../escaped.txt", "outputs/../../escaped.txt", "/tmp/escaped-absolute.txt", "outputs/./x", "", "outputs//x",
     "outputs\\..\\x"],
)
def test_listing_entries_that_escape_are_refused(local_target, project, tmp_path, monkeypatch, hostile_path):
    """A compromised instance can answer the listing with anything: paths are
    checked on this side, before anything is written."""
    outcome = _finished_run(local_target, project)
    real_listing = jobs.list_remote_tree

    def hostile_listing(runner, remote_dir, names=jobs.PULLED_NAMES):
        entries = real_listing(runner, remote_dir, names)
        return [*entries, {"path": hostile_path, "kind": "file", "size": 5, "sha256": "0" * 64}]

    monkeypatch.setattr(jobs.pulling, "list_remote_tree", hostile_listing)
    local = Path(outcome.record.local_dir)
    with pytest.raises(UnsafePath):
        jobs.pull(outcome.record.run_id, resolve=lambda name: local_target)
    assert not (local.parent / "escaped.txt").exists()
    assert not (local.parent.parent / "escaped.txt").exists()
    assert not Path("/tmp/escaped-absolute.txt").exists()
    assert (local / "outputs" / "metrics.json").is_file()


def test_a_local_symlink_cannot_redirect_pulled_files(local_target, project, tmp_path):
    """If runs/<id>/outputs was replaced by a symlink locally, pull refuses to follow it."""
    outcome = _finished_run(local_target, project)
    local = Path(outcome.record.local_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in sorted((local / "outputs").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (local / "outputs").rmdir()
    (local / "outputs").symlink_to(elsewhere)
    with pytest.raises(UnsafePath):
        jobs.pull(outcome.record.run_id, resolve=lambda name: local_target)
    assert list(elsewhere.iterdir()) == []


def test_a_file_changed_after_listing_fails_checksum_and_is_not_installed(local_target, project):
    outcome = _finished_run(local_target, project)
    local = Path(outcome.record.local_dir)
    (local / "outputs" / "metrics.json").unlink()

    class TamperingRunner(LocalRunner):
        """Serves different bytes than the listing announced (a torn checkpoint)."""

        def get_file(self, remote_path: str, local_path: str) -> None:
            super().get_file(remote_path, local_path)
            if remote_path.endswith("metrics.json"):
                Path(local_path).write_text("tampered")

    runner = TamperingRunner(local_target.connect().base_dir)
    report = jobs.pull_files(runner, outcome.record.remote_dir, local)
    assert "outputs/metrics.json" in report.changing
    assert not (local / "outputs" / "metrics.json").exists()
    assert not list(local.rglob("*.gpuflow-part"))
