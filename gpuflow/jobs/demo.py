"""``gpuflow demo``: the whole workflow in the sandbox cloud, in one process.

up (moto EC2 in this process; "the instance" is a directory on this machine)
→ run ``training.cifar10_cnn --dataset digits --visualize`` detached, streaming its
log → pull the checkpoint, history, metrics, curves and pictures, verified by sha256
→ down.
The same use cases as ``gpuflow run --up --sandbox --down``; what the demo adds is
the choice of the job, TensorFlow's C++ log quieted for that job alone
(``TF_CPP_MIN_LOG_LEVEL=3``, as ``gpuflow run --env`` would set it: no CUDA noise
on a machine without a GPU), paths on the sandbox instance -- gone once the demo
has torn it down -- printed as the pulled copies that remain, and the summary.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gpuflow.config import gpuflow_home
from gpuflow.errors import DataError
from gpuflow.jobs.on_cluster import run_on_cluster
from gpuflow.jobs.records import MANIFEST_NAME, OUTPUTS_NAME, Say, quiet
from gpuflow.records import ClusterSpec

DEMO_MODULE = "training.cifar10_cnn"
# Adam on sklearn's digits reaches ~97% test accuracy in 15 epochs (~15 s of training on 2 CPU cores).
DEMO_EPOCHS = 15
# The demo's job only: TensorFlow's C++ log (INFO, WARNING and ERROR, e.g. "failed call to
# cuInit ... (303)" on a machine without a GPU) stays quiet; Python's errors still show.
DEMO_JOB_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3"}


@dataclass(frozen=True)
class DemoSummary:
    run_id: str
    cluster: str
    test_accuracy: float
    best_epoch: int | None
    seconds: float
    local_dir: Path
    checkpoint: Path
    curves: Path
    cam: Path
    confusion_matrix: Path
    manifest: Path

    def lines(self) -> list[str]:
        """The summary; a file the run did not leave (a picture it skipped) is not listed."""
        files = [
            ("checkpoint:", self.checkpoint),
            ("curves:    ", self.curves),
            ("grad-cam:  ", self.cam),
            ("confusion: ", self.confusion_matrix),
            ("manifest:  ", self.manifest),
        ]
        return [
            f"test accuracy {self.test_accuracy:.1%} on digits (best epoch {self.best_epoch}), "
            f"{self.seconds:.0f} s from up to down",
            *(f"{label} {path}" for label, path in files if path.exists()),
            f"cluster {self.cluster} is down; `gpuflow runs` lists run {self.run_id}",
        ]


class InstancePaths:
    """Rewrites paths on the demo's sandbox instance (``$GPUFLOW_HOME/sandbox/CLUSTER/ID/...``),
    which ``down`` deletes, into what is left once the demo has ended: a run's directory
    becomes its pulled copy (``PROJECT/runs/RUN_ID``), anything else ``CLUSTER:PATH``
    (a path on the instance, not on this machine)."""

    def __init__(self, home: Path, cluster: str, project_dir: Path) -> None:
        roots = sorted({str(home / "sandbox" / cluster), str((home / "sandbox" / cluster).resolve())}, key=len, reverse=True)
        self._cluster = cluster
        self._runs = str(project_dir / "runs")
        self._pattern = re.compile(
            "(?:" + "|".join(re.escape(root) for root in roots) + r")/[^/\s]+(/runs/[^/\s'\"]+)?(/[^\s'\"]*)?"
        )

    def _replace(self, match: re.Match[str]) -> str:
        run, rest = match.group(1), match.group(2) or ""
        if run:
            return self._runs + run[len("/runs"):] + rest
        return f"{self._cluster}:{rest.lstrip('/') or '.'}"

    def text(self, text: str) -> str:
        return self._pattern.sub(self._replace, text)


class _RewritingWriter:
    """A binary stream that passes whole lines through :class:`InstancePaths` (a path may
    arrive split across two chunks of the log); :meth:`close_line` writes what is left."""

    def __init__(self, out: BinaryIO, paths: InstancePaths) -> None:
        self._out = out
        self._paths = paths
        self._pending = b""

    def write(self, data: bytes) -> int:
        self._pending += bytes(data)
        end = max(self._pending.rfind(b"\n"), self._pending.rfind(b"\r"))
        if end >= 0:
            complete, self._pending = self._pending[: end + 1], self._pending[end + 1 :]
            self._out.write(self._paths.text(complete.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape"))
        return len(data)

    def flush(self) -> None:
        self._out.flush()

    def close_line(self) -> None:
        if self._pending:
            self._out.write(self._paths.text(self._pending.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape"))
            self._pending = b""
        self._out.flush()


def demo_project_dir() -> Path:
    """An empty project: the training package is shipped from this installation."""
    directory = gpuflow_home() / "demo"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def run_demo(
    *,
    out: BinaryIO,
    say: Say = quiet,
    epochs: int = DEMO_EPOCHS,
    project_dir: Path | None = None,
) -> DemoSummary:
    started = time.monotonic()
    cluster_name = f"gpuflow-demo-{secrets.token_hex(2)}"
    spec = ClusterSpec(name=cluster_name, region="us-east-1", instance_type="g5.xlarge", sandbox=True,
                       idle_minutes=30, max_hours=1.0)
    project_dir = project_dir or demo_project_dir()
    paths = InstancePaths(gpuflow_home(), cluster_name, project_dir)
    log = _RewritingWriter(out, paths)
    try:
        outcome = run_on_cluster(
            cluster_name,
            project_dir=project_dir,
            module=DEMO_MODULE,
            args=["--dataset", "digits", "--optimizer", "adam", "--epochs", str(epochs), "--visualize"],
            out=log,  # type: ignore[arg-type] - a binary stream: write and flush
            up_spec=spec,
            down=True,
            say=lambda message: say(paths.text(message)),
            env=DEMO_JOB_ENV,
        )
    finally:
        log.close_line()
    local_dir = Path(outcome.record.local_dir)
    outputs = local_dir / OUTPUTS_NAME
    try:
        metrics = json.loads((outputs / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"the demo run left no readable metrics.json in {outputs}") from exc
    return DemoSummary(
        run_id=outcome.record.run_id,
        cluster=cluster_name,
        test_accuracy=float(metrics["test_accuracy"]),
        best_epoch=metrics.get("best_epoch"),
        seconds=time.monotonic() - started,
        local_dir=local_dir,
        checkpoint=outputs / "best_model.keras",
        curves=outputs / "training_curves.png",
        cam=outputs / "visualization" / "cam.png",
        confusion_matrix=outputs / "visualization" / "confusion_matrix.png",
        manifest=local_dir / MANIFEST_NAME,
    )
