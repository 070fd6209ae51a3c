"""How a hint names a gpuflow command (with --sandbox where the sandbox is in effect)."""

from __future__ import annotations


def command_hint(command: str, sandbox: bool) -> str:
    """A gpuflow command for a hint; in a sandbox context it always says --sandbox
    (the same command without it could act on the real AWS account)."""
    return f"`gpuflow {command}{' --sandbox' if sandbox else ''}`"


__all__ = ["command_hint"]
