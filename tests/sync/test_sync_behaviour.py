"""The sync contract, run against every transport: a local directory (Python
copy), rsync over the loopback OpenSSH server, and the tar stream over it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from gpuflow.errors import StateError
from gpuflow.sync import SYNC_LOCK_SUFFIX, sync_directory
from tests.sync.conftest import HOSTILE_NAMES, write

pytestmark = pytest.mark.ssh


def _tree(root: Path) -> dict[str, bytes]:
    """Every file and link under root: path -> content (links: b'-> target')."""
    found = {}
    for directory, directories, files in os.walk(root):
        for name in files + [d for d in directories if os.path.islink(os.path.join(directory, d))]:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            found[relative] = b"-> " + os.readlink(path).encode() if os.path.islink(path) else Path(path).read_bytes()
    return found


def _mtimes(root: Path) -> dict[str, int]:
    return {path: os.lstat(root / path).st_mtime_ns for path in _tree(root)}


def test_first_sync_sends_every_file_and_hostile_names_arrive_intact(
    project, make_destination, destination_kind, tmp_path
):
    destination, remote, method = make_destination(destination_kind)
    report = sync_directory(project, destination, method=method)

    assert report.method == method
    assert report.files_sent == report.files_considered == len(HOSTILE_NAMES) + 3
    assert report.bytes_sent == report.bytes_considered == sum(len(v) for v in _tree(project).values())
    assert _tree(remote) == _tree(project)
    for name in HOSTILE_NAMES:
        assert (remote / name).read_text() == f"content of {name!r}\n"
    # Modes and mtimes travel, so the next sync can compare them.
    assert _mtimes(remote) == _mtimes(project)
    # Nothing in a name was ever run by a shell.
    assert not any(path.name == "PWNED" for path in tmp_path.rglob("PWNED"))
    assert not Path("PWNED").exists()


def test_resync_without_changes_sends_nothing(project, make_destination, destination_kind):
    destination, remote, method = make_destination(destination_kind)
    sync_directory(project, destination, method=method)
    before = _mtimes(remote)
    inodes = {path: os.lstat(remote / path).st_ino for path in before}

    report = sync_directory(project, destination, method=method)

    assert (report.files_sent, report.bytes_sent, report.files_deleted) == (0, 0, 0)
    assert report.files_considered == len(HOSTILE_NAMES) + 3
    assert _mtimes(remote) == before
    assert {path: os.lstat(remote / path).st_ino for path in before} == inodes


def test_one_changed_file_is_the_only_file_sent(project, make_destination, destination_kind):
    destination, remote, method = make_destination(destination_kind)
    sync_directory(project, destination, method=method)
    untouched = {path: (os.lstat(remote / path).st_ino, mtime) for path, mtime in _mtimes(remote).items()}
    changed = project / "pkg" / "model.py"
    changed.write_text("LAYERS = 4  # deeper\n")
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))  # a later mtime, whatever the clock
    del untouched["pkg/model.py"]

    report = sync_directory(project, destination, method=method)

    assert report.sent == ("pkg/model.py",)
    assert (report.files_sent, report.bytes_sent) == (1, len("LAYERS = 4  # deeper\n"))
    assert (remote / "pkg" / "model.py").read_text() == "LAYERS = 4  # deeper\n"
    assert os.lstat(remote / "pkg" / "model.py").st_mtime_ns == changed.stat().st_mtime_ns
    assert {path: (os.lstat(remote / path).st_ino, os.lstat(remote / path).st_mtime_ns) for path in untouched} == (
        untouched
    )


def test_same_size_edit_and_mode_change_are_detected(project, make_destination, destination_kind):
    destination, remote, method = make_destination(destination_kind)
    sync_directory(project, destination, method=method)
    edited = project / "train.py"
    edited.write_text("print('TRAIN')\n")  # same size
    os.utime(edited, ns=(0, edited.stat().st_mtime_ns + 1_000_000_000))
    (project / "pkg" / "data.csv").chmod(0o600)

    report = sync_directory(project, destination, method=method)

    assert set(report.sent) == {"train.py", "pkg/data.csv"}
    assert (remote / "train.py").read_text() == "print('TRAIN')\n"
    assert (remote / "pkg" / "data.csv").stat().st_mode & 0o777 == 0o600


def test_deletions_propagate_inside_the_destination_only(project, make_destination, destination_kind, tmp_path):
    destination, remote, method = make_destination(destination_kind)
    sync_directory(project, destination, method=method)
    sibling = write(remote.parent / "data" / "keep.bin", b"not part of the project")
    job_cache = write(remote / "pkg" / "__pycache__" / "model.cpython-311.pyc", b"compiled on the instance")
    (project / "pkg" / "data.csv").unlink()
    (project / "dir with space" / "-nested\nfile.txt").unlink()
    (project / "dir with space").rmdir()
    (project / "new\nline.txt").unlink()

    report = sync_directory(project, destination, method=method)

    assert report.files_sent == 0
    assert set(report.deleted) == {"pkg/data.csv", "dir with space/-nested\nfile.txt", "new\nline.txt", "dir with space"}
    assert _tree(remote) == {**_tree(project), "pkg/__pycache__/model.cpython-311.pyc": b"compiled on the instance"}
    assert not (remote / "dir with space").exists()
    assert sibling.read_bytes() == b"not part of the project"
    assert job_cache.exists()  # ignored paths on the destination are left alone, as rsync --delete does


def test_ignore_rules_are_honoured(project, make_destination, destination_kind):
    write(project / ".gitignore", "*.log\nbuild/\n/secret.txt\n")
    write(project / "pkg" / ".gitignore", "!important.log\ngenerated_*.py\n")
    write(project / ".gpuflowignore", "pkg/data.csv\n!weights.h5\n")
    write(project / ".gitignore", "*.log\nbuild/\n/secret.txt\nweights.h5\n")
    for name in ("train.log", "build/out.o", "secret.txt", "pkg/secret.txt", "pkg/important.log", "pkg/generated_1.py",
                 "weights.h5", ".git/HEAD", ".git/objects/ab/cdef", "pkg/__pycache__/x.pyc", ".venv/bin/python",
                 "runs/run-1/metrics.json", "pkg/runs/keep.txt"):
        write(project / name, name)
    destination, remote, method = make_destination(destination_kind)

    sync_directory(project, destination, method=method, skip_top_level=("runs",))

    arrived = set(_tree(remote))
    assert {"pkg/secret.txt", "pkg/important.log", "weights.h5", "pkg/runs/keep.txt", ".gitignore",
            ".gpuflowignore", "pkg/.gitignore"} <= arrived
    for name in ("train.log", "build/out.o", "secret.txt", "pkg/generated_1.py", "pkg/data.csv", ".git/HEAD",
                 "pkg/__pycache__/x.pyc", ".venv/bin/python", "runs/run-1/metrics.json"):
        assert name not in arrived


def test_symlinks_are_never_followed_out_of_the_tree(project, make_destination, destination_kind, tmp_path):
    outside = write(tmp_path / "outside" / "id_rsa", "PRIVATE KEY")
    (project / "escape").symlink_to(outside)  # absolute
    (project / "pkg" / "escape-relative").symlink_to(Path("..") / ".." / "outside" / "id_rsa")
    (project / "pkg" / "escape-dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    (project / "alias.py").symlink_to("train.py")  # stays inside: kept as a link
    (project / "pkg-link").symlink_to("pkg", target_is_directory=True)
    destination, remote, method = make_destination(destination_kind)
    warnings = []

    report = sync_directory(project, destination, method=method, warn=warnings.append)

    assert set(report.skipped_links) == {"escape", "pkg/escape-relative", "pkg/escape-dir"}
    assert len(warnings) == 3
    assert os.readlink(remote / "alias.py") == "train.py"
    assert os.readlink(remote / "pkg-link") == "pkg"
    for leaked in ("escape", "pkg/escape-relative", "pkg/escape-dir"):
        assert not os.path.lexists(remote / leaked)
    assert not [path for path in remote.rglob("*") if path.is_file() and "PRIVATE KEY" in path.read_text(errors="ignore")
                and not path.is_symlink()]


def test_a_destination_symlink_cannot_redirect_writes(project, make_destination, destination_kind, tmp_path):
    destination, remote, method = make_destination(destination_kind)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    remote.mkdir(parents=True)
    (remote / "pkg").symlink_to(elsewhere, target_is_directory=True)  # planted on the instance

    sync_directory(project, destination, method=method)

    assert list(elsewhere.iterdir()) == []
    assert (remote / "pkg").is_dir() and not (remote / "pkg").is_symlink()
    assert (remote / "pkg" / "model.py").read_text() == "LAYERS = 3\n"


def test_dry_run_changes_nothing(project, make_destination, destination_kind):
    destination, remote, method = make_destination(destination_kind)

    report = sync_directory(project, destination, method=method, dry_run=True)

    assert report.dry_run and report.files_sent == len(HOSTILE_NAMES) + 3
    assert not remote.exists()


def test_a_large_tree_asks_first_and_can_be_cancelled(project, make_destination, destination_kind):
    from gpuflow.errors import UsageError

    destination, remote, method = make_destination(destination_kind)
    questions = []

    with pytest.raises(UsageError, match="cancelled"):
        sync_directory(project, destination, method=method, large_files=5,
                       confirm_large=lambda text: questions.append(text) or False)
    assert len(questions) == 1 and "about to send 15 files" in questions[0]
    assert not remote.exists() or not any(remote.iterdir())

    warnings = []
    report = sync_directory(project, destination, method=method, large_bytes=10, warn=warnings.append)
    assert report.files_sent == 15 and len(warnings) == 1 and "gpuflowignore" in warnings[0]


@contextlib.contextmanager
def _held_sync_lock(directory: Path):
    """Hold the destination's sync lock as another gpuflow sync would (flock(2), as flock(1) does)."""
    lock_path = directory.parent / (directory.name + SYNC_LOCK_SUFFIX)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield lock_file
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def test_a_second_sync_waits_for_the_first_and_says_so(project, make_destination, destination_kind):
    destination, directory, method = make_destination(destination_kind)
    warnings: list[str] = []
    released = threading.Event()

    def release_lock(lock_file) -> None:
        released.set()  # before the unlock: a sync that waited for the lock always sees it set
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    with _held_sync_lock(directory) as lock_file:
        # Released only once the sync has said it is waiting (never on a clock: a slow
        # connection must not make the lock free before the sync gets there).
        release = threading.Timer(0.2, release_lock, (lock_file,))

        def warn(message: str) -> None:
            warnings.append(message)
            if "another sync" in message and "waiting" in message and not release.is_alive() and not released.is_set():
                release.start()

        report = sync_directory(project, destination, method=method, warn=warn, lock_wait=30)
        returned_after_release = released.is_set()
        if release.is_alive() or released.is_set():
            release.join()
    assert returned_after_release  # it did wait for the release
    assert [warning for warning in warnings if "another sync" in warning and "waiting" in warning]
    assert report.files_sent == len(_tree(project))
    assert _tree(directory) == _tree(project)  # the lock file lives beside the tree, not in it


def test_a_sync_gives_up_on_a_lock_held_too_long_and_changes_nothing(project, make_destination, destination_kind):
    destination, directory, method = make_destination(destination_kind)
    warnings: list[str] = []
    with _held_sync_lock(directory):
        with pytest.raises(StateError, match="another sync to .* still holds its lock after 1 s"):
            sync_directory(project, destination, method=method, warn=warnings.append, lock_wait=1)
        # A dry run changes nothing, so it does not wait.
        dry = sync_directory(project, destination, method=method, dry_run=True, warn=warnings.append, lock_wait=30)
    assert dry.dry_run and dry.files_sent == len(_tree(project))
    assert len([warning for warning in warnings if "another sync" in warning]) == 1
    assert _tree(directory) == {}
