"""`gpuflow run` on every node of a cluster: TF_CONFIG, one run, a failed worker ends the others.

The job is a stand-in (no TensorFlow): each worker prints its TF_CONFIG and
GPUFLOW_* variables, listens on its own TF_CONFIG address and says hello to
every other worker's, which proves the addresses and ports are right.  The
nodes are two directories (LocalRunner) or two base directories behind the
real loopback OpenSSH server.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import pytest

from gpuflow import procs
from gpuflow.errors import JobFailed, UsageError
from gpuflow.jobs import RunState, RunTarget, load_record
from gpuflow.jobs.foreground import run
from gpuflow.jobs.records import NodeTarget
from gpuflow.jobs.workers import derive_status
from gpuflow.records import Cluster, Node
from gpuflow.transport.local import LocalRunner
from tests.jobs.conftest import _push_project

WORKER_SCRIPT = """\
import json, os, socket, sys, time
config = json.loads(os.environ["TF_CONFIG"])
index, workers = config["task"]["index"], config["cluster"]["worker"]
print("worker", index, "of", os.environ["GPUFLOW_NUM_WORKERS"], "index", os.environ["GPUFLOW_WORKER_INDEX"],
      "tf_config", json.dumps(config, sort_keys=True), flush=True)
host, port = workers[index].rsplit(":", 1)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, int(port)))
server.listen(8)
for other, address in enumerate(workers):
    if other == index:
        continue
    other_host, other_port = address.rsplit(":", 1)
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection((other_host, int(other_port)), timeout=2) as connection:
                connection.sendall(b"hello from %d\\n" % index)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
for _ in range(len(workers) - 1):
    connection, _ = server.accept()
    print("got", connection.makefile().readline().strip(), flush=True)
    connection.close()
if sys.argv[1:] == ["hang"]:
    print("waiting", flush=True)
    time.sleep(300)
"""


def _cluster(count: int) -> Cluster:
    nodes = tuple(Node(f"i-{index:017x}", "running", private_ip=f"10.0.0.{index + 10}") for index in range(count))
    return Cluster(name="multi", region="us-east-1", instance_type="g5.xlarge", ami="ami-0123456789abcdef0",
                   price_per_hour=1.006, nodes=nodes)


def _target(connects) -> RunTarget:
    """A cluster of len(connects) nodes; node I reached through connects[I], on this machine."""
    cluster = _cluster(len(connects))
    nodes = tuple(
        NodeTarget(instance_id=node.instance_id, host="127.0.0.1", connect=connect,
                   sync_project=lambda p, connect=connect: _push_project(connect, p), sandbox=True)
        for node, connect in zip(cluster.nodes, connects)
    )
    return RunTarget(cluster=cluster, connect=connects[0], sync_project=nodes[0].sync_project, nodes=nodes)


@pytest.fixture
def worker_project(tmp_path) -> Path:
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "worker.py").write_text(WORKER_SCRIPT)
    return directory


def _local_connects(tmp_path, count):
    return [lambda base=tmp_path / f"node{index}": LocalRunner(base) for index in range(count)]


def _alive(run_dir: str) -> bool:
    return bool(procs.status(run_dir)["alive"])


def _log(run_dir: str) -> str:
    return Path(run_dir, "job.log").read_text()


def test_a_run_starts_on_every_node_with_tf_config(tmp_path, worker_project, gpuflow_home):
    target = _target(_local_connects(tmp_path, 2))
    out = io.BytesIO()
    outcome = run(target, project_dir=worker_project, module=None, args=["python", "worker.py"], out=out,
                  home=gpuflow_home, poll_interval=0.1)
    record = load_record(outcome.record.run_id, gpuflow_home)
    assert record.status is RunState.SUCCEEDED and outcome.exit_code == 0
    chief, worker = record.workers
    assert record.remote_dir == chief.remote_dir and chief.remote_dir.startswith(str(tmp_path / "node0"))
    assert worker.remote_dir.startswith(str(tmp_path / "node1"))
    assert (chief.host, worker.host) == ("127.0.0.1", "127.0.0.1") and chief.port != worker.port
    # the chief's log is what streamed; each worker said hello to the other over its TF_CONFIG address
    streamed = out.getvalue().decode()
    assert "worker 0 of 2 index 0" in streamed and "got hello from 1" in streamed
    assert "worker 1 of 2 index 1" in _log(worker.remote_dir) and "got hello from 0" in _log(worker.remote_dir)
    config = json.loads(streamed.split("tf_config ", 1)[1].splitlines()[0])
    assert config == {"cluster": {"worker": [chief.address, worker.address]}, "task": {"index": 0, "type": "worker"}}
    manifest = json.loads((Path(record.local_dir) / "manifest.json").read_text())
    assert [(w["index"], w["instance_id"], w["address"], w["gpu"]) for w in manifest["workers"]] == [
        (0, chief.instance_id, chief.address, "none"), (1, worker.instance_id, worker.address, "none")]
    assert manifest["instance_count"] == 2  # the cost counts every node
    assert not _alive(chief.remote_dir) and not _alive(worker.remote_dir)
    # `gpuflow logs RUN --all`: every node's log, prefixed by its node; `--node 1`: node 1's as it is
    from gpuflow.jobs import node_logs

    resolve = lambda _name: target  # noqa: E731 - the run's cluster, as this test reaches it
    every = io.BytesIO()
    assert node_logs(record.run_id, out=every, resolve=resolve, home=gpuflow_home) is None
    lines = every.getvalue().decode().splitlines()
    assert "[node 0] got hello from 1" in lines and "[node 1] got hello from 0" in lines
    one = io.BytesIO()
    assert node_logs(record.run_id, out=one, node=1, resolve=resolve, home=gpuflow_home) == 0
    assert one.getvalue().decode() == _log(worker.remote_dir)
    with pytest.raises(UsageError, match="no node 2"):
        node_logs(record.run_id, out=one, node=2, resolve=resolve, home=gpuflow_home)


def test_nodes_k_runs_on_the_first_k_and_one_node_has_no_tf_config(tmp_path, worker_project, gpuflow_home):
    target = _target(_local_connects(tmp_path, 2))
    command = ["python", "-c", "import os; print('TF_CONFIG' in os.environ, os.environ.get('GPUFLOW_NUM_WORKERS'))"]
    out = io.BytesIO()
    outcome = run(target, project_dir=worker_project, module=None, args=command, out=out, home=gpuflow_home,
                  poll_interval=0.1, nodes=1)
    assert out.getvalue().decode().strip() == "False None"
    assert outcome.record.workers == ()
    assert not (tmp_path / "node1" / "runs").exists()  # nothing started on node 1
    with pytest.raises(UsageError, match="--nodes 3: cluster multi has 2 node"):
        run(target, project_dir=worker_project, module=None, args=command, out=out, home=gpuflow_home, nodes=3)


def test_killing_worker_1_fails_the_run_naming_node_1_and_ends_every_node(tmp_path, worker_project, gpuflow_home):
    target = _target(_local_connects(tmp_path, 2))
    outcome = run(target, project_dir=worker_project, module=None, args=["python", "worker.py", "hang"],
                  out=io.BytesIO(), home=gpuflow_home, detach=True)
    chief, worker = outcome.record.workers
    deadline = time.monotonic() + 60
    while "waiting" not in _log(worker.remote_dir) or "waiting" not in _log(chief.remote_dir):
        assert time.monotonic() < deadline, _log(chief.remote_dir) + _log(worker.remote_dir)
        time.sleep(0.1)
    os.killpg(procs.proven(os.path.join(worker.remote_dir, procs.JOB_RECORD)), signal.SIGKILL)
    from gpuflow.jobs import logs

    out = io.BytesIO()
    with pytest.raises(JobFailed) as failed:  # followed as `gpuflow logs -f` would, then the run's status
        from gpuflow.jobs.connection import Connection
        from gpuflow.jobs.foreground import follow_to_outcome

        follow_to_outcome(Connection(target, target.connect(), 30, lambda _: None), outcome.record, out=out,
                          home=gpuflow_home, poll_interval=0.1)
    assert "node 1 failed: its job exited with code 137" in failed.value.message
    record = load_record(outcome.record.run_id, gpuflow_home)
    assert record.status is RunState.FAILED and "node 1 failed" in record.status_text()
    assert "node 1 failed: its job exited with code 137: ending this worker (node 0)" in out.getvalue().decode()
    assert not _alive(chief.remote_dir) and not _alive(worker.remote_dir)  # nothing left on any node
    assert logs is not None


def test_the_status_of_many_nodes_names_the_first_failure():
    ended_by_peer = {"exit_code": 143, "alive": False, "peer_failure": {"node": 1, "reason": "failed: boom"}}
    died = {"exit_code": 137, "alive": False, "peer_failure": None}
    assert derive_status([ended_by_peer, died]).note == "node 1 failed: its job exited with code 137"
    assert derive_status([ended_by_peer, {"exit_code": None, "alive": True}]).note == "node 1 failed: boom"
    # A worker whose collective broke when its peer died exits 70 (training.distributed's WorkerLost),
    # sometimes before its peer watch has heard of the death: the death is the cause, whatever the order.
    lost_its_peer = {"exit_code": 70, "alive": False, "peer_failure": None}
    assert derive_status([lost_its_peer, died]).note == "node 1 failed: its job exited with code 137"
    assert derive_status([lost_its_peer, died]).exit_code == 137
    assert derive_status([died, lost_its_peer]).note == "node 0 failed: its job exited with code 137"
    assert derive_status([lost_its_peer, ended_by_peer]).note == "node 1 failed: boom"
    assert derive_status([{"exit_code": 0}, lost_its_peer]).note == "node 1 failed: its job exited with code 70"
    assert derive_status([{"exit_code": 0}, {"exit_code": 0}]).state is RunState.SUCCEEDED
    assert derive_status([{"exit_code": 0}, {"exit_code": None, "alive": True}]).state is RunState.RUNNING


def _wait_for_waiting(record, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not all(Path(w.remote_dir, "job.log").is_file() and "waiting" in _log(w.remote_dir) for w in record.workers):
        assert time.monotonic() < deadline, [_log(w.remote_dir) for w in record.workers if Path(w.remote_dir).is_dir()]
        time.sleep(0.1)


def test_runs_shows_one_status_from_every_node_and_stop_stops_them_all(tmp_path, worker_project, gpuflow_home):
    from gpuflow.jobs import list_runs, resume, stop

    target = _target(_local_connects(tmp_path, 2))
    resolve = lambda _name: target  # noqa: E731
    record = run(target, project_dir=worker_project, module=None, args=["python", "worker.py", "hang"],
                 out=io.BytesIO(), home=gpuflow_home, detach=True).record
    _wait_for_waiting(record)
    [listed] = list_runs(resolve=resolve, home=gpuflow_home)
    assert listed.status.state is RunState.RUNNING
    stopped, _outcome = stop(record.run_id, grace_seconds=5, resolve=resolve, home=gpuflow_home)
    assert not any(_alive(worker.remote_dir) for worker in record.workers)  # every node's job, not only the chief's
    assert stopped.status is RunState.FAILED and stopped.finished
    with pytest.raises(UsageError, match="ran on 2 nodes"):
        resume(record.run_id, out=io.BytesIO(), resolve=resolve, home=gpuflow_home)


def test_runs_names_the_node_that_died(tmp_path, worker_project, gpuflow_home):
    from gpuflow.jobs import list_runs

    target = _target(_local_connects(tmp_path, 2))
    record = run(target, project_dir=worker_project, module=None, args=["python", "worker.py", "hang"],
                 out=io.BytesIO(), home=gpuflow_home, detach=True).record
    _wait_for_waiting(record)
    chief, worker = record.workers
    os.killpg(procs.proven(os.path.join(worker.remote_dir, procs.JOB_RECORD)), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while _alive(chief.remote_dir):  # the chief's supervisor ends its job (its peer watch)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [listed] = list_runs(resolve=lambda _name: target, home=gpuflow_home)
    assert str(listed.status) == "failed(137) (node 1 failed: its job exited with code 137)"
    assert json.loads(Path(chief.remote_dir, "peer_failure.json").read_text()) == {
        "node": 1, "reason": "failed: its job exited with code 137"}


def test_the_dead_mans_switch_of_a_worker_node_counts_its_job_busy(tmp_path, worker_project, gpuflow_home):
    """The switch exactly as user-data installs it, run once over node 1's base directory."""
    import subprocess

    from infra.userdata import installed_deadman_script

    target = _target(_local_connects(tmp_path, 2))
    record = run(target, project_dir=worker_project, module=None, args=["python", "worker.py", "hang"],
                 out=io.BytesIO(), home=gpuflow_home, detach=True).record
    try:
        _wait_for_waiting(record)
        worker = record.workers[1]
        (tmp_path / "node1" / "heartbeat").unlink()  # only the job itself may keep it busy here
        script = tmp_path / "gpuflow-deadman"
        script.write_text(installed_deadman_script())
        status_file = tmp_path / "deadman.status"
        switch = subprocess.Popen(
            ["bash", str(script), "--base-dir", str(tmp_path / "node1"), "--log-file", str(tmp_path / "deadman.log"),
             "--state-file", str(tmp_path / "idle-since"), "--status-file", str(status_file),
             "--deadline-file", str(tmp_path / "deadline"), "--ssh-port", "1", "--interval", "0.1",
             "--uptime-from", "start", "--shutdown-command", "true"],
            env={**os.environ, "GPUFLOW_DEADMAN_IDLE_SECONDS": "3600"}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not status_file.is_file():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            status = status_file.read_text()
        finally:
            os.killpg(switch.pid, signal.SIGKILL)
            switch.wait(timeout=10)
        assert "verdict=busy" in status
        assert f"reason=job {record.run_id} (pid " in status and Path(worker.remote_dir, "job.pid").is_file()
    finally:
        from gpuflow.jobs import stop

        stop(record.run_id, grace_seconds=2, resolve=lambda _name: target, home=gpuflow_home)


def test_tf_config_is_gpuflows_on_several_nodes_and_yours_on_one(tmp_path, worker_project, gpuflow_home):
    target = _target(_local_connects(tmp_path, 2))
    with pytest.raises(UsageError, match="TF_CONFIG is set by gpuflow"):
        run(target, project_dir=worker_project, module=None, args=["true"], out=io.BytesIO(), home=gpuflow_home,
            env={"TF_CONFIG": "{}"})
    assert not (tmp_path / "node0" / "runs").exists() and not (tmp_path / "node1" / "runs").exists()
    with pytest.raises(UsageError, match="GPUFLOW_WORKER_INDEX is set by gpuflow"):
        run(target, project_dir=worker_project, module=None, args=["true"], out=io.BytesIO(), home=gpuflow_home,
            env={"GPUFLOW_WORKER_INDEX": "3"}, nodes=1)
    out = io.BytesIO()
    run(target, project_dir=worker_project, module=None, out=out, home=gpuflow_home, env={"TF_CONFIG": "{}"}, nodes=1,
        args=["python", "-c", "import os; print(os.environ['TF_CONFIG'])"], poll_interval=0.1)
    assert out.getvalue() == b"{}\n"
