"""``gpuflow demo``: the whole workflow in the sandbox cloud, in one process.

up (moto EC2 in this process; "the instance" is a directory on this machine)
→ run ``training.cifar10_cnn --dataset digits --visualize`` detached, streaming its
log → pull the checkpoint, history, metrics, curves and pictures, verified by sha256
→ down.
The same use cases as ``gpuflow run --up --sandbox --down``; nothing special
is done for the demo except choosing the job and summarising its metrics.
"""

from __future__ import annotations

import json
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
        return [
            f"test accuracy {self.test_accuracy:.1%} on digits (best epoch {self.best_epoch}), "
            f"{self.seconds:.0f} s from up to down",
            f"checkpoint: {self.checkpoint}",
            f"curves:     {self.curves}",
            f"grad-cam:   {self.cam}",
            f"confusion:  {self.confusion_matrix}",
            f"manifest:   {self.manifest}",
            f"cluster {self.cluster} is down; `gpuflow runs` lists run {self.run_id}",
        ]


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
    outcome = run_on_cluster(
        cluster_name,
        project_dir=project_dir or demo_project_dir(),
        module=DEMO_MODULE,
        args=["--dataset", "digits", "--optimizer", "adam", "--epochs", str(epochs), "--visualize"],
        out=out,
        up_spec=spec,
        down=True,
        say=say,
    )
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
