"""The connection a follow or pull holds to its target: reconnecting after a drop, telling a drop from a terminated instance."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from gpuflow.errors import GpuflowError, InstanceGone, UnreachableHost
from gpuflow.jobs.records import RunTarget, Say
from gpuflow.transport.base import CommandRunner


def instance_gone(target: RunTarget) -> str | None:
    """Why the target's instance is known to be gone (its ``instance_alive``
    says so), or None: it runs, or nobody can tell right now."""
    if target.instance_alive is None:
        return None
    try:
        if target.instance_alive():
            return None
    except GpuflowError:
        return None  # the cloud could not say: not a reason to give up
    nodes = target.cluster.nodes
    which = nodes[0].instance_id if nodes else f"(cluster {target.cluster.name})"
    return f"its instance {which} is no longer running"


@dataclass
class Connection:
    """The current runner and how to replace it after a drop (local to one call)."""

    target: RunTarget
    runner: CommandRunner
    reconnect_timeout: float
    say: Say
    reconnects: int = 0

    def instance_gone(self) -> str | None:
        return instance_gone(self.target)

    def reconnect(self, error: Exception) -> None:
        if isinstance(error, InstanceGone):
            raise error
        with contextlib.suppress(Exception):
            self.runner.close()
        self.say(f"connection lost ({error}); reconnecting — the job keeps running")
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.25
        last_error: Exception = error
        while time.monotonic() < deadline:
            gone = self.instance_gone()  # a terminated instance never answers: stop asking it
            if gone is not None:
                raise InstanceGone(gone) from last_error
            try:
                runner = self.target.connect()
                runner.run(["true"], timeout=30)
            except InstanceGone:
                raise
            except (UnreachableHost, OSError, EOFError) as exc:
                last_error = exc
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.runner = runner
            self.reconnects += 1
            self.say("reconnected")
            return
        raise UnreachableHost(
            f"cannot reach {self.target.cluster.name} for {self.reconnect_timeout:g}s: {last_error}",
            hint="the job keeps running; reattach later with `gpuflow logs RUN -f`",
        ) from last_error


# Failures after which a reconnect may help (an InstanceGone never reaches these: it is raised).
TRANSIENT = (UnreachableHost, OSError, EOFError)
