"""A run on several nodes: one run id, one job per node with ``TF_CONFIG``, one status derived from all of them.

What runs where: every node (the first ``--nodes K`` of the cluster, the head
first) gets the project (and ``--data``), synced in parallel, its environment
prepared, and the same job in its own run directory ``<base>/runs/<run-id>``,
with ``TF_CONFIG`` (``cluster.worker`` = each node's private address and the
worker port, ``task.index`` = the node's index; node 0, the head, is the chief),
``GPUFLOW_NUM_WORKERS`` and ``GPUFLOW_WORKER_INDEX``.  The run's record is the
chief's (its log streams, its outputs are pulled) with every node in
:attr:`RunRecord.workers`.  Each node's supervisor watches its peers
(:mod:`gpuflow.jobs.peer_watch`): a node that fails ends the others.

On AWS every node listens on the same fixed port (:data:`WORKER_PORT_RANGE`'s
first, the peer watch on the next), opened to the cluster's own security group
only.  A sandbox cluster's nodes are directories on this machine: each worker
gets free ports of its own on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from gpuflow.errors import GpuflowError, UnreachableHost, UsageError
from gpuflow.jobs.manifest import build_manifest
from gpuflow.jobs.peer_watch import KILL_GRACE_SECONDS, PEER_FAILURE_NAME, PEERS_NAME, UNREACHABLE_SECONDS
from gpuflow.jobs.records import (
    ENVIRONMENT_NAME,
    LOG_NAME,
    MANIFEST_NAME,
    PEER_LOST_EXIT_CODE,
    READ_CHUNK,
    NodeTarget,
    RunRecord,
    RunState,
    RunStatus,
    RunTarget,
    Say,
    WorkerNode,
    iso,
    new_run_id,
    quiet,
    save_record,
    utc_now,
)
from gpuflow.jobs.rundir import await_environment, classify, read_json, run_status, stop_job
from gpuflow.jobs.start import checked_job_env, job_setup, launch_and_wait, prepare_node, start_run, write_supervisor
from gpuflow.provisioner import WORKER_PORT_RANGE
from gpuflow.state import validate_name
from gpuflow.transport.base import CommandRunner, quote_argv

# How long `run` waits, after the chief ended, for the other nodes to end by themselves
# (their peer watch ends them within UNREACHABLE_SECONDS + KILL_GRACE_SECONDS) before it stops them.
SETTLE_SECONDS = UNREACHABLE_SECONDS + KILL_GRACE_SECONDS + 15

T = TypeVar("T")


def node_count(target: RunTarget, nodes: int | None) -> int:
    """How many nodes a run uses: ``nodes`` (``--nodes K``: the first K), else all of the cluster's."""
    available = len(target.nodes)
    if nodes is None:
        return max(1, available)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise UsageError(f"--nodes {nodes!r}: expected a whole number of nodes, at least 1")
    if nodes > max(1, available):
        raise UsageError(
            f"--nodes {nodes}: cluster {target.cluster.name} has {max(1, available)} node(s)",
            hint=f"use --nodes {max(1, available)} or fewer, or launch a bigger cluster (`gpuflow up --count {nodes}`)",
        )
    return nodes


def tf_config(workers: Sequence[WorkerNode], index: int) -> str:
    """``TF_CONFIG`` for worker ``index``: every worker's address, this one's task (0: the chief)."""
    return json.dumps(
        {"cluster": {"worker": [worker.address for worker in workers]}, "task": {"type": "worker", "index": index}},
        separators=(",", ":"),
    )


def worker_env(workers: Sequence[WorkerNode], index: int) -> dict[str, str]:
    """The variables every job of a multi-node run gets (training modules and plain commands alike)."""
    return {
        "TF_CONFIG": tf_config(workers, index),
        "GPUFLOW_NUM_WORKERS": str(len(workers)),
        "GPUFLOW_WORKER_INDEX": str(index),
    }


def peers_document(workers: Sequence[WorkerNode], index: int) -> dict[str, Any]:
    """``peers.json`` for worker ``index``'s peer watch: where it answers, whom it asks."""
    me = workers[index]
    return {
        "index": index,
        "listen": [me.host, me.watch_port],
        "peers": [{"index": w.index, "host": w.host, "port": w.watch_port} for w in workers if w.index != index],
    }


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (a sandbox's workers)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def plan_workers(
    nodes: Sequence[NodeTarget], base_dirs: Sequence[str], run_id: str, *, free_ports: Callable[[int], list[int]] = free_loopback_ports
) -> list[WorkerNode]:
    """Each node's worker: its address and ports, its run directory."""
    sandbox_ports = free_ports(2 * len(nodes)) if any(node.sandbox for node in nodes) else []
    workers = []
    for index, (node, base_dir) in enumerate(zip(nodes, base_dirs)):
        if node.sandbox:
            port, watch_port = sandbox_ports[2 * index], sandbox_ports[2 * index + 1]
        else:
            port, watch_port = WORKER_PORT_RANGE[0], WORKER_PORT_RANGE[0] + 1
        if not node.host:
            raise UnreachableHost(
                f"node {index} ({node.instance_id}) has no private address yet",
                hint="wait until every instance runs (`gpuflow status`), then run again",
            )
        workers.append(WorkerNode(index, node.instance_id, node.host, port, watch_port, f"{base_dir}/runs/{run_id}"))
    return workers


def _in_parallel(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``calls`` at once; their results in order, or the first failure (after all have ended)."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def start(
    target: RunTarget,
    runner: CommandRunner,
    *,
    nodes: int | None = None,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    run_id: str | None = None,
    data_dir: Path | None = None,
    heartbeat_seconds: float = 30,
    home: Path | None = None,
    say: Say = quiet,
    env: Mapping[str, str] | None = None,
) -> RunRecord:
    """Start a run on the cluster's nodes (``nodes``: the first K; default all of them): on one
    node as :func:`gpuflow.jobs.start.start_run` does, on several with :func:`start_on_nodes`."""
    count = node_count(target, nodes)
    options: dict[str, Any] = dict(project_dir=project_dir, module=module, args=args, data_dir=data_dir,
                                   heartbeat_seconds=heartbeat_seconds, home=home, say=say)
    if count == 1:
        return start_run(target, runner, run_id=run_id, env=env, **options)
    extra_env = checked_job_env(env)
    if "TF_CONFIG" in extra_env:  # on one node it is the user's to set; on several, gpuflow's
        raise UsageError("TF_CONFIG is set by gpuflow for a run on several nodes",
                         hint="drop --env TF_CONFIG=..., or run on one node with --nodes 1")
    run_id = validate_name(run_id or new_run_id(), "run id")
    return start_on_nodes(target, runner, count=count, run_id=run_id, extra_env=extra_env,
                          **{**options, "project_dir": Path(project_dir).resolve()})


def start_on_nodes(
    target: RunTarget,
    head_runner: CommandRunner,
    *,
    count: int,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    run_id: str,
    data_dir: Path | None,
    heartbeat_seconds: float,
    home: Path | None,
    say: Say,
    extra_env: Mapping[str, str],
) -> RunRecord:
    """Sync and prepare the first ``count`` nodes in parallel, start the job on each with
    ``TF_CONFIG``; the record is the chief's, with every node in ``workers``.  When a node's
    job cannot be started, those already started are stopped and the run is lost."""
    chosen = target.nodes[:count]
    name = target.cluster.name
    runners = [head_runner] + [node.connect() for node in chosen[1:]]
    try:
        prepared = _in_parallel([
            (lambda i=i: prepare_node(runners[i], f"{name} node {i}", chosen[i].sync_project, chosen[i].sync_data,
                                      project_dir, data_dir, say))
            for i in range(count)
        ])
        workers = plan_workers(chosen, [runner.base_dir for runner in runners], run_id)
        record = None
        for i, (runner, worker) in enumerate(zip(runners, workers)):
            python, remote_data_dir = prepared[i]
            argv, job_env = job_setup(runner, module, args, run_id, worker.remote_dir, python, remote_data_dir,
                                      extra_env, project_dir)
            job_env.update(worker_env(workers, i))
            if record is None:  # the chief's
                record = RunRecord(
                    run_id=run_id, cluster=name, base_dir=runner.base_dir, remote_dir=worker.remote_dir,
                    command=tuple(argv), project_dir=str(project_dir), local_dir=str(project_dir / "runs" / run_id),
                    started_at=iso(utc_now()), module=module, workers=tuple(workers),
                )
            write_supervisor(runner, record, argv, job_env, python, heartbeat_seconds, remote_dir=worker.remote_dir)
            runner.put_bytes(json.dumps(peers_document(workers, i)).encode(), f"{worker.remote_dir}/{PEERS_NAME}")
        assert record is not None
        manifest = build_manifest(record=record, cluster=target.cluster, project_dir=project_dir, environment={})
        manifest["workers"] = [
            {"index": w.index, "instance_id": w.instance_id, "address": w.address, "chief": w.index == 0}
            for w in workers
        ]
        runners[0].put_bytes(json.dumps(manifest, indent=2).encode(), f"{record.remote_dir}/{MANIFEST_NAME}")
        save_record(record, home)
        try:
            _in_parallel([(lambda i=i: launch_and_wait(runners[i], workers[i].remote_dir)) for i in range(count)])
        except GpuflowError as exc:
            for runner, worker in zip(runners, workers):  # nothing of a run that did not start stays running
                with contextlib.suppress(GpuflowError, OSError):
                    stop_job(runner, worker.remote_dir, grace_seconds=5)
            save_record(replace(record, status=RunState.LOST,
                                lost_reason=f"its job was not seen to start on every node: {exc.message}"), home)
            raise
    finally:
        for runner in runners[1:]:
            with contextlib.suppress(Exception):
                runner.close()
    say(f"run {run_id} started on {count} nodes of {name} (node 0 is the chief): {quote_argv(record.command)}")
    return record


# ----------------------------------------------------------------------------- one run, many processes


def _node_runner(target: RunTarget, worker: WorkerNode) -> CommandRunner:
    for node in target.nodes:
        if node.instance_id == worker.instance_id:
            return node.connect()
    raise UnreachableHost(f"node {worker.index} ({worker.instance_id}) is no longer part of cluster {target.cluster.name}")


def node_target(target: RunTarget, worker: WorkerNode) -> RunTarget:
    """``target`` reaching ``worker``'s node (for following its log)."""
    if worker.index == 0:
        return target
    return replace(target, connect=lambda: _node_runner(target, worker), instance_alive=None)


def node_reports(target: RunTarget, record: RunRecord) -> list[dict[str, Any]]:
    """Each node's run directory as :func:`run_status` reports it, with its ``peer_failure``
    (None when that node's job was not ended by a peer); a node that cannot be asked: ``{"unreachable": reason}``."""

    def ask(worker: WorkerNode) -> dict[str, Any]:
        try:
            runner = _node_runner(target, worker)
        except GpuflowError as exc:
            return {"unreachable": exc.message}
        try:
            report = dict(run_status(runner, worker.remote_dir).get(worker.remote_dir, {}))
            report["peer_failure"] = read_json(runner, f"{worker.remote_dir}/{PEER_FAILURE_NAME}")
            environment = _read_document(runner, f"{worker.remote_dir}/{ENVIRONMENT_NAME}")
            if environment is None and report.get("exit_code") is not None:  # its probe may still run
                await_environment(runner, worker.remote_dir)
                environment = _read_document(runner, f"{worker.remote_dir}/{ENVIRONMENT_NAME}")
            report["gpu"] = environment.get("gpu") if isinstance(environment, dict) else None
            return report
        except (GpuflowError, OSError, ValueError) as exc:
            return {"unreachable": str(exc)}
        finally:
            with contextlib.suppress(Exception):
                runner.close()

    return _in_parallel([(lambda worker=worker: ask(worker)) for worker in record.workers])


def _read_document(runner: CommandRunner, path: str) -> Any:
    """A remote JSON file of any size up to 4 MiB (pip freeze lists are long), or None."""
    try:
        return json.loads(runner.read_from(path, 0, 4 << 20).decode())
    except (GpuflowError, OSError, ValueError):
        return None


def derive_status(reports: Sequence[Mapping[str, Any]]) -> RunStatus:
    """One status for a multi-node run: succeeded when every node's job exited 0; failed
    as soon as one failed — naming the node whose failure came first (not one a peer
    ended because of it) and why; lost when a node's job vanished without an exit code;
    else running.  Causes rank before consequences, whichever node's report comes
    first: a node's own failure; then a failure a peer watch passed on; then a job that
    exited :data:`PEER_LOST_EXIT_CODE` on its own (its collective broke when a peer died,
    sometimes before its peer watch heard of the death)."""
    first_failure: tuple[int, int, str] | None = None
    passed_on: tuple[int, int, str] | None = None
    lost_a_peer: tuple[int, int, str] | None = None
    lost: str | None = None
    running = False
    for index, report in enumerate(reports):
        if "unreachable" in report:
            running = True  # cannot tell right now
            continue
        code = report.get("exit_code")
        status = classify(report)
        if code is None:
            if status.state is RunState.LOST:
                lost = lost or f"node {index}'s job is gone without an exit code"
            else:
                running = True
            continue
        if int(code) == 0:
            continue
        peer = report.get("peer_failure")
        if isinstance(peer, dict) and "node" in peer:
            passed_on = passed_on or (int(code), int(peer["node"]), f"node {peer['node']} {peer.get('reason', 'failed')}")
        else:
            own = (int(code), index, f"node {index} failed: its job exited with code {code}")
            if int(code) == PEER_LOST_EXIT_CODE:
                lost_a_peer = lost_a_peer or own
            else:
                first_failure = first_failure or own
    failure = first_failure or passed_on or lost_a_peer
    if failure is not None:
        code, _node, why = failure
        return RunStatus(RunState.FAILED, code, note=why)
    if lost is not None:
        return RunStatus(RunState.LOST, note=lost)
    if running:
        return RunStatus(RunState.RUNNING)
    return RunStatus(RunState.SUCCEEDED, 0)


def settle(
    target: RunTarget, record: RunRecord, *, say: Say, timeout: float = SETTLE_SECONDS, poll: float = 0.5
) -> RunStatus:
    """After the chief's job ended: wait until every node's has (their peer watch ends them), stop
    what still runs after ``timeout`` — nothing is left running on any node — and derive the run's status."""
    deadline = time.monotonic() + timeout
    while True:
        reports = node_reports(target, record)
        pending = [i for i, report in enumerate(reports) if report.get("exit_code") is None and report.get("alive")]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if pending:
        say(f"stopping the job still running on node(s) {', '.join(map(str, pending))}")
        stop_nodes(target, record, grace_seconds=10, only=pending)
        reports = node_reports(target, record)
    _record_node_gpus(target, record, reports)
    fetch_worker_logs(target, record, say=say)
    return derive_status(reports)


def worker_log_path(record: RunRecord, index: int) -> Path:
    """Where node ``index``'s log is kept locally: ``runs/<run-id>/nodes/<index>/job.log``."""
    return Path(record.local_dir) / "nodes" / str(int(index)) / LOG_NAME


def fetch_worker_logs(target: RunTarget, record: RunRecord, *, say: Say = quiet) -> None:
    """Copy every other node's ``job.log`` into the run's local directory (the chief's is pulled
    with its outputs): ``gpuflow logs RUN --node I`` still has it once the cluster is gone."""
    for worker in record.workers[1:]:
        destination = worker_log_path(record, worker.index)
        try:
            runner = _node_runner(target, worker)
        except GpuflowError as exc:
            say(f"node {worker.index}'s log was not copied: {exc.message}")
            continue
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            temporary = destination.with_name(destination.name + ".part")
            with temporary.open("wb") as handle:
                offset = 0
                while chunk := runner.read_from(f"{worker.remote_dir}/{LOG_NAME}", offset, READ_CHUNK):
                    handle.write(chunk)
                    offset += len(chunk)
            temporary.replace(destination)
        except (GpuflowError, OSError) as exc:
            say(f"node {worker.index}'s log was not copied: {exc}")
        finally:
            with contextlib.suppress(Exception):
                runner.close()


def _record_node_gpus(target: RunTarget, record: RunRecord, reports: Sequence[Mapping[str, Any]]) -> None:
    """Each node's GPU (its supervisor's probe) into the chief's manifest, before it is pulled."""
    path = f"{record.remote_dir}/{MANIFEST_NAME}"
    try:
        runner = _node_runner(target, record.workers[0])
    except GpuflowError:
        return
    try:
        manifest = _read_document(runner, path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("workers"), list):
            return
        for entry, report in zip(manifest["workers"], reports):
            if isinstance(entry, dict):
                entry["gpu"] = report.get("gpu")
        runner.put_bytes(json.dumps(manifest, indent=2).encode(), path)
    except (GpuflowError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            runner.close()


def stop_nodes(target: RunTarget, record: RunRecord, *, grace_seconds: float, only: Sequence[int] | None = None) -> None:
    """SIGTERM (then SIGKILL) the job on each node of the run (but the ones not in ``only``), in parallel."""

    def stop(worker: WorkerNode) -> None:
        try:
            runner = _node_runner(target, worker)
        except GpuflowError:
            return
        try:
            stop_job(runner, worker.remote_dir, grace_seconds=grace_seconds)
        except (GpuflowError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                runner.close()

    chosen = [worker for worker in record.workers if only is None or worker.index in only]
    _in_parallel([(lambda worker=worker: stop(worker)) for worker in chosen])


class PrefixedOutput:
    """``out`` with each line prefixed by ``[node I] `` (``gpuflow logs RUN --all``)."""

    def __init__(self, out: BinaryIO, index: int) -> None:
        self.out = out
        self.prefix = f"[node {index}] ".encode()
        self.at_line_start = True

    def write(self, data: bytes) -> int:
        pieces = []
        for line in data.splitlines(keepends=True):
            if self.at_line_start:
                pieces.append(self.prefix)
            pieces.append(line)
            self.at_line_start = line.endswith(b"\n")
        self.out.write(b"".join(pieces))
        return len(data)

    def finish(self) -> None:
        if not self.at_line_start:
            self.out.write(b"\n")
            self.at_line_start = True

    def flush(self) -> None:
        self.out.flush()
