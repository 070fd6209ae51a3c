"""`gpuflow tensorboard`: a run's event files served from the pulled copy after `down`, and from the node through SSH."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from gpuflow.jobs.records import RunRecord, save_record
from gpuflow.procs import identity
from tests.sshd import SshServer, sshd_available
from tests.tunnels.conftest import INSTANCE_ID
from tests.waiting import wait_for

pytest.importorskip("tensorboard")
pytestmark = pytest.mark.slow


@pytest.fixture
def sshd(tmp_path, tensorboard_without_tensorflow):
    """The loopback sshd, its sessions' TensorBoard without TensorFlow (as the `tensorboard` extra installs it:
    it starts in a second instead of importing TensorFlow)."""
    if not sshd_available():
        pytest.fail("OpenSSH server not installed: run `apt-get install -y openssh-server rsync` (.ci/run does)")
    server = SshServer(tmp_path / "sshd", extra_config=(f"SetEnv PYTHONPATH={tensorboard_without_tensorflow}",))
    yield server.start()
    server.stop()


def write_events(logdir: Path) -> None:
    """An event file with two epoch_loss scalars, as Keras' TensorBoard callback writes under train/."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(logdir / "train"))
    for step, loss in enumerate((0.9, 0.4)):
        writer.add_event(Event(step=step, wall_time=1.0 + step, summary=Summary(
            value=[Summary.Value(tag="epoch_loss", simple_value=loss)])))
    writer.close()


def run_record(run_id: str, cluster: str, remote_dir: Path, local_dir: Path) -> RunRecord:
    return RunRecord(
        run_id=run_id, cluster=cluster, base_dir=str(remote_dir.parent.parent), remote_dir=str(remote_dir),
        command=("python", "-m", "training.mnist_mlp"), project_dir=str(local_dir.parent.parent),
        local_dir=str(local_dir), started_at="2026-11-30T17:00:00Z",
    )


def _tags(url: str) -> dict:
    with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=30) as response:
        return json.loads(response.read())


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    return [int(child) for child in found]


def test_after_down_the_pulled_copy_is_served_here(gpuflow_home, tmp_path, gpuflow_process,
                                                  tensorboard_without_tensorflow):
    local = tmp_path / "project" / "runs" / "20261130-170000-ab12"
    write_events(local / "outputs" / "tensorboard")
    save_record(run_record("20261130-170000-ab12", "gone-box", tmp_path / "nowhere" / "runs" / "x", local))

    process = gpuflow_process("tensorboard", "20261130-170000-ab12")
    url = process.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and "epoch_loss" in _tags(url)["train"]
    [server] = _children(process.pid)
    server_identity = identity(server)
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert "serving its pulled copy" in process.stderr.read()
    assert identity(server) != server_identity  # TensorBoard ended with it


@pytest.mark.ssh
def test_a_live_run_is_served_from_the_node_through_ssh(through_sshd, gpuflow_home, tmp_path, gpuflow_process):
    remote = gpuflow_home / "sandbox" / "box" / INSTANCE_ID / "runs" / "20261130-170000-cd34"
    write_events(remote / "outputs" / "tensorboard")
    save_record(run_record("20261130-170000-cd34", "box", remote, tmp_path / "project" / "runs" / "r"))

    process = gpuflow_process("tensorboard", "20261130-170000-cd34")
    url = process.stdout.readline().strip()
    assert url, process.stderr.read()
    assert "epoch_loss" in _tags(url)["train"]
    (ssh,) = _children(process.pid)
    assert b"tensorboard.main" in Path(f"/proc/{ssh}/cmdline").read_bytes()  # run by the session, on the node
    logdir = str(remote / "outputs" / "tensorboard")
    matching = subprocess.run(["pgrep", "-f", "--", f"tensorboard.main --logdir {logdir}"], capture_output=True,
                              text=True, check=False).stdout.split()
    [served] = [pid for pid in matching if int(pid) != ssh]  # the ssh command line names it too
    served_identity = identity(int(served))
    assert served_identity is not None
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    # The closed session hangs up on the node's TensorBoard: nothing is left running there.
    wait_for(lambda: identity(int(served)) != served_identity, timeout=60, what="the node's TensorBoard to end")


@pytest.mark.ssh
def test_a_node_port_taken_meanwhile_moves_the_nodes_tensorboard_to_the_next_free_one(
    through_sshd, gpuflow_home, tmp_path, monkeypatch, capsys, instance_http
):
    from gpuflow import clusters
    from gpuflow.cli import app, run_app
    from gpuflow.tunnels import tensorboard as board
    from tests.tunnels.gpuflow_with_running_cloud import RunningCloud

    remote = gpuflow_home / "sandbox" / "box" / INSTANCE_ID / "runs" / "20261130-170000-ef78"
    write_events(remote / "outputs" / "tensorboard")
    save_record(run_record("20261130-170000-ef78", "box", remote, tmp_path / "project" / "runs" / "r"))
    monkeypatch.setattr(clusters, "cloud_probe", lambda provisioner_factory=None: RunningCloud())
    taken = instance_http  # another program's HTTP server took the port: it answers, and is not TensorBoard
    probed = board._free_node_port
    found: list[int] = []

    def raced(runner, name, python, start, avoid):  # the node's free port, taken by another process just after
        found.append(taken if not found else probed(runner, name, python, start, avoid))
        return found[-1]

    monkeypatch.setattr(board, "_free_node_port", raced)
    answered: list[dict] = []
    waited = board.wait_until_answering

    def serving_then_ctrl_c(url, logdir, alive, seconds=board.READY_SECONDS):
        waited(url, logdir, alive, seconds)
        answered.append(_tags(url))
        raise KeyboardInterrupt

    monkeypatch.setattr(board, "wait_until_answering", serving_then_ctrl_c)
    assert run_app(app, ["tensorboard", "20261130-170000-ef78"]) == 0
    err = capsys.readouterr().err
    assert len(found) == 2 and found[1] != taken
    assert f"port {taken} on box was taken meanwhile: using {found[1]}" in err
    assert "epoch_loss" in answered[0]["train"]  # the node's TensorBoard, served on the port it moved to
