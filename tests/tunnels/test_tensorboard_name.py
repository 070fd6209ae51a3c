"""`gpuflow tensorboard NAME`: every run on the cluster (``~/gpuflow/runs``), here from a sandbox node without sshd
(this machine: TensorBoard runs here over the node's directory, listening on 127.0.0.1 only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request

import pytest

from tests.tunnels.conftest import INSTANCE_ID
from tests.tunnels.test_tensorboard_serve import write_events

pytest.importorskip("tensorboard")
pytestmark = pytest.mark.slow


def test_a_cluster_name_serves_every_run_on_it(sandbox_cluster, gpuflow_home, gpuflow_process,
                                               tensorboard_without_tensorflow):
    runs = gpuflow_home / "sandbox" / "box" / INSTANCE_ID / "runs"
    for run_id in ("20261130-170000-aa11", "20261130-180000-bb22"):
        write_events(runs / run_id / "outputs" / "tensorboard")

    process = gpuflow_process("tensorboard", "box")
    url = process.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), process.stderr.read()
    with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=30) as response:
        tags = json.loads(response.read())
    assert {run: "epoch_loss" in tags[run] for run in tags} == {
        "20261130-170000-aa11/outputs/tensorboard/train": True,
        "20261130-180000-bb22/outputs/tensorboard/train": True,
    }
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=5):
        pass  # 127.0.0.1 only
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) == 0
