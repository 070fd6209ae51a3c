"""gpuflow CLI: sync commands (placeholder until its issue lands)."""

from __future__ import annotations

from gpuflow.cli import app  # noqa: F401
