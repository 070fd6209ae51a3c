"""Ignore patterns: git's semantics (checked against git itself) in time linear in
pattern times path, whatever the pattern."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpuflow.errors import ConfigError
from gpuflow.sync.ignore import scan_tree
from gpuflow.sync.wildmatch import IgnoreSpec, Steps, compile_ignore_line
from tests.sync.conftest import write

REPO_ROOT = Path(__file__).resolve().parents[2]

# (pattern, path, is_directory): patterns that make a backtracking matcher (a
# translated regex, a recursive fnmatch) take exponential or high-polynomial time.
PATHOLOGICAL = [
    ("*a*a*a*a*a*a*a*a*b", "a" * 60, False),
    ("*a*a*a*a*a*a*a*a*b", "a" * 200 + "c", False),
    ("*a*a*a*a*a*a*a*a*a*a*a*a*", "ab" * 11 + "b" * 170, False),
    ("a*a*a*a*a*a*a*a*a*a*a*a*b", "a" * 250, False),
    ("*[ab]*[ab]*[ab]*[ab]*[ab]*[ab]*c", "ab" * 100, False),
    ("?*?*?*?*?*?*?*?*?*?*b", "x" * 200, False),
    ("*a?*a?*a?*a?*a?*a?*b", "a" * 200, False),
    ("**/**/**/**/**/**/**/**/**/**/x", "/".join(["d"] * 40) + "/y", False),
    ("**/a/**/a/**/a/**/a/**/a/**/b", "/".join(["a"] * 40), False),
    ("/**/a*a*a*a*/**/a*a*a*a*/**/c", "/".join(["a" * 20] * 15), True),
    ("d/**/*a*a*a*a*a*a*b/**", "d/" + "/".join(["a" * 30] * 10), False),
]


@pytest.mark.parametrize(("pattern", "path", "is_directory"), PATHOLOGICAL)
def test_pathological_patterns_cost_at_most_pattern_times_path(pattern, path, is_directory):
    steps = Steps()
    assert IgnoreSpec([pattern]).decide(path, is_directory, steps) is None
    assert steps.count <= 4 * (len(pattern) + 1) * (len(path) + 1)
    # The same shapes where they do match still cost no more.
    matching = path[:-1] + "b" if not pattern.endswith("/**") else path
    steps = Steps()
    IgnoreSpec([pattern, "!" + pattern, pattern]).decide(matching, is_directory, steps)
    assert steps.count <= 3 * 4 * (len(pattern) + 1) * (len(matching) + 1)


_SCAN = """
import sys
from pathlib import Path
from gpuflow.sync.ignore import scan_tree
print("\\n".join(scan_tree(Path(sys.argv[1])).paths()))
"""


def test_sync_scan_with_the_reported_pattern_finishes(tmp_path):
    # The report: this .gitignore line and one 60-character name kept `sync` busy past 30 s.
    write(tmp_path / ".gitignore", "*a*a*a*a*a*a*a*a*b\n**/**/**/**/**/**/**/**/c\n")
    write(tmp_path / ("a" * 60), "x")
    write(tmp_path / ("a" * 59 + "b"), "x")
    write(tmp_path / "/".join(["d"] * 20) / "e", "x")
    completed = subprocess.run(  # a generous bound, not a speed assertion: a hang would exceed it by far
        [sys.executable, "-c", _SCAN, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [".gitignore", "a" * 60, "/".join(["d"] * 20) + "/e"]


# ------------------------------------------------------------------ against git itself

_NAMES = ["a", "b", "ab", "ba", "a.b", "b.a", "aa", "x", "a-b", "[a]", "a b", "é", "#a", "!b", "a*", "ab.c"]
_PIECES = ["a", "b", "*", "**", "?", "[ab]", "[!a]", "[a-b]", "[]a]", "[[:alpha:]]", ".", "x", "\\*", "*.b", "a*",
           "*a", "é", "?b", "[^b]", "\\#a", "\\!b", "[a", "a\\ "]


def _random_tree(rng: random.Random, root: Path) -> None:
    for _ in range(rng.randint(6, 16)):
        depth = rng.randint(1, 4)
        path = root.joinpath(*(rng.choice(_NAMES) for _ in range(depth)))
        if any(parent.is_file() for parent in [*path.parents, path] if parent != root and root in parent.parents):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            path.write_text("x")


def _random_pattern(rng: random.Random) -> str:
    pattern = "/".join(rng.choice(_PIECES) for _ in range(rng.choice([1, 1, 1, 2, 2, 3])))
    if rng.random() < 0.2:
        pattern = "/" + pattern
    if rng.random() < 0.25:
        pattern += "/"
    if rng.random() < 0.2:
        pattern = "!" + pattern
    if rng.random() < 0.1:
        pattern += "  "
    return pattern


def _git_untracked(root: Path, environment: dict[str, str]) -> set[str]:
    output = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True, env=environment,
    ).stdout
    return {os.fsdecode(name) for name in output.split(b"\0") if name}


def _scan_reporting_malformed(root: Path, ignore_files: list[tuple[Path, list[str]]]) -> set[str]:
    """scan_tree's paths; a malformed line (git lets it match nothing) must be
    reported as the first such line of its file, and without it the scan must
    still agree with git."""
    for path, lines in ignore_files:
        malformed = [number for number, line in enumerate(lines, 1) if (compile_ignore_line(line) or _VALID).error]
        if malformed:
            with pytest.raises(ConfigError, match=rf"\.gitignore:{malformed[0]}: invalid pattern"):
                scan_tree(root)
            path.write_text("".join(line + "\n" for number, line in enumerate(lines, 1) if number not in malformed))
    return set(scan_tree(root).paths())


_VALID = compile_ignore_line("x")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_random_trees_and_patterns_agree_with_git(tmp_path):
    environment = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                   "LC_ALL": "C"}
    rng = random.Random(20261130)
    disagreements = []
    for case in range(120):
        root = tmp_path / f"case{case}"
        root.mkdir()
        subprocess.run(["git", "init", "-q", str(root)], check=True, env=environment)
        (root / ".git" / "info" / "exclude").write_text("")
        _random_tree(rng, root)
        lines = [_random_pattern(rng) for _ in range(rng.randint(1, 5))]
        (root / ".gitignore").write_text("\n".join(lines) + "\n")
        subdirectories = [path for path in root.rglob("*") if path.is_dir() and ".git" not in path.parts]
        nested_lines: list[str] = []
        if subdirectories and rng.random() < 0.5:
            nested = rng.choice(subdirectories)
            nested_lines = [_random_pattern(rng) for _ in range(rng.randint(1, 3))]
            (nested / ".gitignore").write_text("\n".join(nested_lines) + "\n")
        theirs = _git_untracked(root, environment)
        ours = _scan_reporting_malformed(root, [(root / ".gitignore", lines)] + (
            [(nested / ".gitignore", nested_lines)] if nested_lines else []))
        if ours != theirs:
            disagreements.append((lines, nested_lines, sorted(ours ^ theirs)))
    assert not disagreements, disagreements[:5]
