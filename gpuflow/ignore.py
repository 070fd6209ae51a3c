"""Old import path of :mod:`gpuflow.sync.ignore` (the sync's file list and ignore rules)."""
# SHIM: removed after the restructure merge

from gpuflow.sync.ignore import (
    ALWAYS_SKIPPED,
    IGNORE_FILE_NAMES,
    PROJECT_SKIPPED_TOP_LEVEL,
    IgnoreRules,
    LocalEntry,
    SourceTree,
    scan_tree,
)

__all__ = [
    "ALWAYS_SKIPPED",
    "IGNORE_FILE_NAMES",
    "PROJECT_SKIPPED_TOP_LEVEL",
    "IgnoreRules",
    "LocalEntry",
    "SourceTree",
    "scan_tree",
]
