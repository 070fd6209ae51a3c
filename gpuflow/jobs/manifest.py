"""The run manifest: what is known at start (cluster, git state), the environment probe's facts, and the job's end and cost."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
from pathlib import Path
from typing import Any

from gpuflow.jobs.records import Attempt, RunRecord
from gpuflow.records import Cluster

def git_state(project_dir: Path) -> dict[str, Any] | None:
    """Commit and a hash of uncommitted changes, or None outside a git repo."""

    def git(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(project_dir), *argv], capture_output=True, check=False)

    try:
        head = git("rev-parse", "HEAD")
    except OSError:
        return None
    if head.returncode != 0:
        return None
    diff = git("diff", "HEAD", "--binary").stdout
    untracked = git("ls-files", "--others", "--exclude-standard").stdout.decode(errors="replace").split("\n")
    return {
        "commit": head.stdout.decode().strip(),
        "dirty": bool(diff),
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
        "untracked_files": len([name for name in untracked if name]),
    }


def build_manifest(
    *,
    record: RunRecord,
    cluster: Cluster,
    project_dir: Path,
    environment: dict[str, Any],
) -> dict[str, Any]:
    """What is known at start; the environment facts come from the
    supervisor's ``environment.json`` (merged at pull), end time and cost
    when the job has ended."""
    node = cluster.nodes[0] if cluster.nodes else None
    return {
        "run_id": record.run_id,
        "command": list(record.command),
        "module": record.module,
        "cluster": cluster.name,
        "instance_type": cluster.instance_type,
        "instance_id": node.instance_id if node else None,
        "instance_count": max(1, len(cluster.nodes)),
        "ami": cluster.ami,
        "ami_name": cluster.ami_name,
        "ami_parameter": cluster.ami_parameter,
        "region": cluster.region,
        "sandbox": cluster.sandbox,
        "price_per_hour": cluster.price_per_hour,
        "git": git_state(project_dir),
        **environment_fields(environment),
        "started_at": record.started_at,
        "job_started_at": None,
        "ended_at": None,
        "exit_code": None,
        "duration_seconds": None,
        "estimated_cost_usd": None,
    }


def environment_fields(environment: dict[str, Any]) -> dict[str, Any]:
    """The manifest's view of the environment probe (None where unknown)."""
    return {
        "gpu": environment.get("gpu"),
        "gpu_driver": environment.get("gpu_driver"),
        "python": environment.get("python"),
        "tensorflow": environment.get("tensorflow"),
        "keras": environment.get("keras"),
        "pip_freeze": environment.get("pip_freeze", []),
    }


def finish_manifest(
    manifest: dict[str, Any],
    *,
    job_started_at: str | None,
    ended_at: str,
    exit_code: int | None,
    earlier_seconds: float | None = None,
) -> dict[str, Any]:
    """Add the job's start and end, exit code, duration and cost (price/h x instances x hours).

    ``started_at`` is when gpuflow started the run, on this machine's clock; the job's
    start and end are read on the instance's clock, and the duration comes from those two
    only, so a skewed laptop clock cannot distort it.  A job that never started (its
    working directory was missing) has no duration and no cost.  A resumed run's duration
    and cost add ``earlier_seconds``, what its job ran before its last resume.
    """
    seconds = cost = None
    if job_started_at is not None:
        started = datetime.datetime.fromisoformat(job_started_at)
        seconds = max(0.0, (datetime.datetime.fromisoformat(ended_at) - started).total_seconds())
        seconds += earlier_seconds or 0.0
        price = manifest.get("price_per_hour")
        if price is not None:
            cost = round(float(price) * manifest.get("instance_count", 1) * seconds / 3600, 4)
    return {
        **manifest,
        "job_started_at": job_started_at,
        "ended_at": ended_at,
        "exit_code": exit_code,
        "duration_seconds": None if seconds is None else round(seconds, 1),
        "estimated_cost_usd": cost,
    }



def with_attempts(manifest: dict[str, Any], attempts: tuple[Attempt, ...]) -> dict[str, Any]:
    """The manifest with every attempt of a recovered run (``attempts``, oldest first) and their
    total cost (``attempts_cost_usd``; None while one attempt's price is unknown)."""
    if not attempts:
        return manifest
    costs = [attempt.cost_usd for attempt in attempts]
    total = None if any(cost is None for cost in costs) else round(sum(costs), 6)  # type: ignore[arg-type]
    return {**manifest, "attempts": [attempt.to_dict() for attempt in attempts], "attempts_cost_usd": total}
