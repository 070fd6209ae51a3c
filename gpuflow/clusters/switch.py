"""What an instance's dead-man's switch thinks right now, for `gpuflow status`.

Every check (30 s) the switch (``infra/assets/deadman.sh``) writes its verdict
to a small file of ``key=value`` lines on the instance::

    verdict=busy|idle|stopping
    updated_at=<epoch>          idle_seconds=<the --idle-minutes window>
    deadline=<epoch>            the --max-hours cap (persisted across reboots)
    idle_since=<epoch>          stop_at=<epoch>   (while idle)
    reason=<one line>           one per reason it is busy

:func:`read_switches` reads it from each running node over SSH (pinned host
keys, one short attempt, **without** touching the heartbeat: looking must not
keep the instance up) and turns it into :class:`SwitchStatus`.  The
instance's clock is read in the same command, so times are shown on this
machine's clock even when the two disagree.  Reading never fails the command:
an unreachable node gives a status with ``error`` set.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gpuflow import nodes
from gpuflow.errors import GpuflowError
from gpuflow.records import Cluster, Node
from gpuflow.transport.base import quote_argv
from gpuflow.transport.ssh import Backoff

INSTANCE_STATUS_PATH = "/run/gpuflow/deadman.status"  # infra/userdata.py's DEADMAN_STATUS_PATH (a test checks)
SANDBOX_STATUS_NAME = "deadman.status"  # a sandbox instance's, in its directory
STALE_AFTER_SECONDS = 180  # six missed checks: the switch is probably not running
CONNECT_TIMEOUT_SECONDS = 10.0
_NO_STATUS = "no status from the switch yet (still booting, or launched by a gpuflow without it)"


class Verdict(str, enum.Enum):
    BUSY = "busy"
    IDLE = "idle"
    STOPPING = "stopping"


@dataclass(frozen=True)
class SwitchStatus:
    """One node's switch; times are epoch seconds on this machine's clock."""

    instance_id: str
    verdict: Verdict | None = None  # None: unknown, see error
    reasons: tuple[str, ...] = ()
    idle_seconds: int | None = None
    idle_since: float | None = None
    stop_at: float | None = None  # the idle timer's end (idle only)
    deadline: float | None = None  # the max-hours cap
    updated_at: float | None = None
    error: str | None = None

    @property
    def stale(self) -> bool:
        return self.updated_at is not None and time.time() - self.updated_at > STALE_AFTER_SECONDS

    @property
    def stops_at(self) -> float | None:
        """When it will stop if nothing changes: the idle timer's end or the cap, whichever is first."""
        moments = [moment for moment in (self.stop_at, self.deadline) if moment is not None]
        return min(moments) if moments else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "verdict": self.verdict.value if self.verdict else None,
            "reasons": list(self.reasons),
            "idle_minutes": None if self.idle_seconds is None else round(self.idle_seconds / 60, 2),
            "idle_since": _iso(self.idle_since),
            "stops_at": _iso(self.stops_at),
            "max_hours_deadline": _iso(self.deadline),
            "updated_at": _iso(self.updated_at),
            "stale": self.stale,
            "error": self.error,
        }


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def parse_status(text: str, instance_id: str, *, local_now: float | None = None) -> SwitchStatus:
    """The reading command's output (``now=<instance epoch>`` then the file) as
    a :class:`SwitchStatus`; anything unexpected gives one with ``error``."""
    local_now = time.time() if local_now is None else local_now
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, separator, value = line.partition("=")
        if separator:
            values.setdefault(key.strip(), []).append(value)

    def number(key: str) -> int | None:
        raw = (values.get(key) or [""])[0].strip()
        return int(raw) if raw.isdigit() else None

    remote_now = number("now")
    if "verdict" not in values:
        return SwitchStatus(instance_id, error=_NO_STATUS)
    try:
        verdict = Verdict(values["verdict"][0].strip())
    except ValueError:
        return SwitchStatus(instance_id, error=f"unreadable status (verdict {values['verdict'][0][:40]!r})")
    skew = (local_now - remote_now) if remote_now is not None else 0.0

    def moment(key: str) -> float | None:
        value = number(key)
        return None if value is None else value + skew

    return SwitchStatus(
        instance_id,
        verdict=verdict,
        reasons=tuple(reason.strip()[:300] for reason in values.get("reason", []) if reason.strip()),
        idle_seconds=number("idle_seconds"),
        idle_since=moment("idle_since"),
        stop_at=moment("stop_at"),
        deadline=moment("deadline"),
        updated_at=moment("updated_at"),
    )


def _reading_script(path: str) -> str:
    return f'printf "now=%s\\n" "$(date +%s)"; cat -- {quote_argv([path])} 2>/dev/null; true'


def read_switch(cluster: Cluster, node: Node, *, runner_factory: Callable[..., Any] | None = None) -> SwitchStatus:
    """The switch's status on ``node``, read over SSH (or locally for a sandbox without sshd)."""
    reach = nodes.access_for(cluster).reach
    if reach is nodes.Reach.DIRECTORY and runner_factory is None:
        # The sandbox instance is a directory here: look, without creating anything.
        try:
            text = (nodes.sandbox_directory(cluster, node) / SANDBOX_STATUS_NAME).read_text(errors="replace")
        except OSError:
            text = ""
        return _checked(parse_status(f"now={int(time.time())}\n{text}", node.instance_id), cluster)
    runner_factory = runner_factory or nodes.runner_for
    try:
        runner = runner_factory(
            cluster, node, touch_heartbeat=False, connect_timeout=CONNECT_TIMEOUT_SECONDS, backoff=Backoff(retries=0)
        )
        try:
            path = INSTANCE_STATUS_PATH if reach is nodes.Reach.SSH else f"{runner.base_dir}/{SANDBOX_STATUS_NAME}"
            result = runner.run_script(_reading_script(path), timeout=30, check=False)
        finally:
            runner.close()
    except GpuflowError as exc:
        return SwitchStatus(node.instance_id, error=exc.one_line())
    except Exception as exc:  # noqa: BLE001 - showing the switch must never fail `status`
        return SwitchStatus(node.instance_id, error=f"cannot read it: {type(exc).__name__}: {exc}")
    return _checked(parse_status(result.stdout.decode("utf-8", errors="replace"), node.instance_id), cluster)


def _checked(status: SwitchStatus, cluster: Cluster) -> SwitchStatus:
    if status.verdict is None and status.error == _NO_STATUS and cluster.sandbox:
        return SwitchStatus(status.instance_id, error="no switch status (the sandbox runs no dead-man's switch)")
    return status


def read_switches(cluster: Cluster, **options: Any) -> list[SwitchStatus]:
    """Each running node's switch (nodes in other states have none to ask)."""
    return [read_switch(cluster, node, **options) for node in cluster.nodes if node.state == "running"]


# ---------------------------------------------------------------------- for people


def _clock(moment: float, now: float) -> str:
    """'14:05 UTC (in 48m)'; with the date when it is not today."""
    same_day = time.gmtime(moment)[:3] == time.gmtime(now)[:3]
    text = time.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC", time.gmtime(moment))
    delta = moment - now
    return f"{text} ({'in ' if delta >= 0 else ''}{_span(abs(delta))}{'' if delta >= 0 else ' ago'})"


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def describe(statuses: Sequence[SwitchStatus], *, now: float | None = None) -> list[str]:
    """Lines for `gpuflow status`: why each node counts as busy or idle, and when it will stop."""
    now = time.time() if now is None else now
    lines: list[str] = []
    for status in statuses:
        head = f"dead-man's switch on {status.instance_id}: "
        if status.verdict is None:
            lines.append(head + f"unknown: {status.error}")
            continue
        cap = f"max-hours cap at {_clock(status.deadline, now)}" if status.deadline is not None else "no max-hours cap read"
        window = f"{_span(status.idle_seconds)}" if status.idle_seconds is not None else "the idle window"
        if status.verdict is Verdict.BUSY:
            lines.append(head + "busy: " + "; ".join(status.reasons or ("(no reason given)",)))
            lines.append(f"  stops {window} after it goes idle, or at the {cap}")
        elif status.verdict is Verdict.IDLE:
            since = _clock(status.idle_since, now) if status.idle_since is not None else "?"
            stop = _clock(status.stops_at, now) if status.stops_at is not None else "?"
            lines.append(head + f"idle since {since}: no job, heartbeat, SSH session or GPU use")
            lines.append(f"  stops at {stop} unless that changes ({cap})")
        else:
            lines.append(head + "stopping now (idle window over or max-hours cap reached)")
        if status.stale and status.updated_at is not None:
            lines.append(f"  warning: last written {_span(now - status.updated_at)} ago; the switch may not be running")
    return lines
