"""Old import path of :mod:`gpuflow.sync.wildmatch` (git's ignore patterns)."""
# SHIM: removed after the restructure merge

from gpuflow.sync.wildmatch import IgnorePattern, IgnoreSpec, Steps, compile_ignore_line

__all__ = ["IgnorePattern", "IgnoreSpec", "Steps", "compile_ignore_line"]
