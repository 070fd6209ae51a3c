"""Old home of :mod:`gpuflow.clusters.switch` (the dead-man's switch's status); re-exports it."""
# SHIM: removed after the restructure merge

from __future__ import annotations

from gpuflow.clusters.switch import (
    CONNECT_TIMEOUT_SECONDS,
    INSTANCE_STATUS_PATH,
    SANDBOX_STATUS_NAME,
    STALE_AFTER_SECONDS,
    SwitchStatus,
    Verdict,
    describe,
    parse_status,
    read_switch,
    read_switches,
)

__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "INSTANCE_STATUS_PATH",
    "SANDBOX_STATUS_NAME",
    "STALE_AFTER_SECONDS",
    "SwitchStatus",
    "Verdict",
    "describe",
    "parse_status",
    "read_switch",
    "read_switches",
]
