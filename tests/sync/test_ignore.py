"""The file list: git's ignore semantics, fixed skips, symlink policy."""

from __future__ import annotations

from gpuflow.sync.ignore import scan_tree
from gpuflow.sync import DestinationEntry, DestinationState, parse_find_listing, plan_sync
from tests.sync.conftest import write


def test_nested_gitignore_negation_and_gpuflowignore(tmp_path):
    write(tmp_path / ".gitignore", "*.log\n/data/\nmodels/\n")
    write(tmp_path / "src" / ".gitignore", "!keep.log\n")
    write(tmp_path / "src" / ".gpuflowignore", "fixtures/\n")
    write(tmp_path / ".gpuflowignore", "!models/\n")  # re-include what git ignores
    for name in ("a.log", "src/keep.log", "src/other.log", "data/big.bin", "src/data/small.bin",
                 "models/best.keras", "src/fixtures/f.json", "src/x.py"):
        write(tmp_path / name, "x")

    paths = set(scan_tree(tmp_path).paths())

    assert paths == {".gitignore", ".gpuflowignore", "src/.gitignore", "src/.gpuflowignore", "src/keep.log",
                     "src/data/small.bin", "models/best.keras", "src/x.py"}


def test_a_file_under_an_ignored_directory_cannot_be_reincluded(tmp_path):
    write(tmp_path / ".gitignore", "build/\n!build/keep.txt\n")
    write(tmp_path / "build" / "keep.txt", "x")
    assert scan_tree(tmp_path).paths() == [".gitignore"]


def test_fixed_skips(tmp_path):
    for name in (".git/config", "a/.git/HEAD", "__pycache__/m.pyc", "pkg/__pycache__/m.pyc", ".venv/pyvenv.cfg",
                 "runs/r1/log", "pkg/runs/code.py", "ok.py"):
        write(tmp_path / name, "x")
    assert scan_tree(tmp_path, skip_top_level=("runs",)).paths() == ["ok.py", "pkg/runs/code.py"]
    assert "runs/r1/log" in scan_tree(tmp_path).paths()  # a data directory keeps its runs/


def test_the_rules_also_judge_destination_only_paths(tmp_path):
    write(tmp_path / ".gitignore", "checkpoints/\n*.tmp\n")
    write(tmp_path / "train.py", "x")
    tree = scan_tree(tmp_path)
    state = DestinationState(exists=True, entries={
        "train.py": DestinationEntry("file", 1, 0, 0o644),
        "checkpoints": DestinationEntry("dir"),
        "checkpoints/best.keras": DestinationEntry("file", 9),
        "old.py": DestinationEntry("file", 3),
        "scratch.tmp": DestinationEntry("file", 3),
        "gone": DestinationEntry("dir"),
        "gone/deeper": DestinationEntry("dir"),
        "gone/deeper/x.py": DestinationEntry("file", 1),
    })
    plan = plan_sync(tree, state)
    assert plan.to_delete == ("gone/deeper/x.py", "old.py", "gone/deeper", "gone")


def test_find_listing_parses_any_name():
    raw = b"f\x00644\x0012\x001700000000.1234567890\x00\x00new\nline\x00" \
          b"l\x00777\x003\x001700000001.0000000000\x00../x\x00-link\x00" \
          b"d\x00755\x004096\x001700000002.5\x00\x00dir with space\x00"
    entries = parse_find_listing(raw)
    assert entries["new\nline"] == DestinationEntry("file", 12, 1_700_000_000_123_456_789, 0o644)
    assert entries["-link"] == DestinationEntry("link", 0, 1_700_000_001_000_000_000, 0, "../x")
    assert entries["dir with space"].kind == "dir"
    assert entries["dir with space"].mtime_ns == 1_700_000_002_500_000_000
