"""The suite's own scheduling under pytest-xdist (tests/conftest.py): the heavy files that
are handed out first must exist, or the list has rotted and the long tail comes back."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import HEAVY_FILES_FIRST

ROOT = Path(__file__).resolve().parent.parent


def test_every_heavy_file_named_for_scheduling_exists_once():
    assert len(set(HEAVY_FILES_FIRST)) == len(HEAVY_FILES_FIRST)
    assert [path for path in HEAVY_FILES_FIRST if not (ROOT / path).is_file()] == []
