"""`run --recover` after a spot notice (the mock IMDSv2 of tests/jobs/imds_mock.py): the job
saves and exits 75, gpuflow relaunches (a fake relauncher hands out a fresh LocalRunner
"node") and attempt 2 continues the same run; and the order a relaunch tries launches in."""

from __future__ import annotations

import io
from dataclasses import replace

from gpuflow.clusters.relaunch import Candidate, launch_order
from gpuflow.jobs import RunTarget, load_record
from gpuflow.jobs.records import AttemptEnd
from gpuflow.jobs.recover import RecoveryPolicy, run_with_recovery
from gpuflow.records import Node
from gpuflow.transport.local import LocalRunner
from tests.jobs.recover_helpers import manifest_of, recover_job_args, recover_project, step_count, store, trained  # noqa: F401
from tests.jobs.spot_helpers import imds, spot_cluster, wait_until  # noqa: F401 - fixtures


def test_a_spot_notice_relaunches_and_the_same_run_continues(tmp_path, recover_project, store, imds):
    nodes = [Node("i-first", "running", availability_zone="us-east-1a", lifecycle="spot")]

    def resolve(_name: str) -> RunTarget:
        node = nodes[-1]
        base = tmp_path / node.instance_id

        def push(project_dir):
            runner = LocalRunner(base)
            runner.put_bytes((project_dir / "recoverjob.py").read_bytes(), f"{base}/project/recoverjob.py")

        return RunTarget(cluster=replace(spot_cluster(), nodes=(node,)), connect=lambda: LocalRunner(base),
                         sync_project=push)

    asked: list[dict] = []

    def relauncher(name: str, **options):
        asked.append({"name": name, **options})
        imds.clear_notice()  # the new node has no notice
        nodes.append(Node("i-second", "running", availability_zone="us-east-1c", lifecycle="spot"))
        return type("Replacement", (), {"availability_zone": "us-east-1c", "instance_id": "i-second",
                                        "instance_type": "g5.xlarge", "market": "spot"})()

    said: list[str] = []
    out = io.BytesIO()
    import threading

    def notice_after_some_steps():
        wait_until(lambda: step_count(store) >= 3, 30, "3 steps")
        imds.notice()

    threading.Thread(target=notice_after_some_steps, daemon=True).start()
    outcome = run_with_recovery(
        "spotbox", resolve=resolve, policy=RecoveryPolicy(fallback_types=("g6.xlarge",)), project_dir=recover_project,
        module=None, args=recover_job_args(12, 0.05), out=out, env={"STORE": str(store)}, say=said.append,
        poll_interval=0.05, relauncher=relauncher,
    )
    assert outcome.exit_code == 0
    record = load_record(outcome.record.run_id)
    assert [(a.instance_id, a.ended) for a in record.attempts] == [
        ("i-first", AttemptEnd.INTERRUPTED), ("i-second", AttemptEnd.SUCCEEDED)]
    assert asked == [{"name": "spotbox", "fallback_types": ("g6.xlarge",), "avoid_zone": "us-east-1a",
                      "progress": said.append}]
    assert sorted(set(trained(store))) == list(range(12))
    remark = next(line for line in said if "relaunching" in line)
    assert f"run {record.run_id}: interrupted at epoch 0 step " in remark and "spot interruption notice" in remark
    assert any("relaunched in us-east-1c: i-second" in line for line in said)
    log = (tmp_path / "i-second" / "runs" / record.run_id / "job.log").read_text()
    assert log.startswith("started") and "interrupted: checkpoint saved" in log and log.rstrip().endswith("finished")
    assert out.getvalue().decode() == log  # one stream: attempt 2's output follows attempt 1's, nothing twice
    assert manifest_of(record.local_dir)["attempts"][0]["ended"] == "interrupted"


def test_launch_order_other_zones_first_then_fallback_types_then_on_demand():
    zones = {"g5.xlarge": ["us-east-1a", "us-east-1b", "us-east-1c"], "g6.xlarge": ["us-east-1a", "us-east-1d"],
             "g4dn.xlarge": []}
    order = launch_order("g5.xlarge", ["g6.xlarge", "g4dn.xlarge", "g5.xlarge"], zones, spot=True,
                         spot_fallback=True, avoid_zone="us-east-1a")
    assert order == [
        Candidate("g5.xlarge", ("us-east-1b", "us-east-1c", "us-east-1a"), "spot"),
        Candidate("g6.xlarge", ("us-east-1d", "us-east-1a"), "spot"),
        Candidate("g5.xlarge", ("us-east-1b", "us-east-1c", "us-east-1a"), "on-demand"),
        Candidate("g6.xlarge", ("us-east-1d", "us-east-1a"), "on-demand"),
    ]
    assert [c.market for c in launch_order("g5.xlarge", [], zones, spot=True, spot_fallback=False, avoid_zone=None)] == ["spot"]
    assert [c.market for c in launch_order("g5.xlarge", [], zones, spot=False, spot_fallback=False, avoid_zone=None)] == ["on-demand"]


def test_max_restarts_bounds_the_relaunches(tmp_path, recover_project, store, imds):
    import pytest

    from gpuflow.errors import JobFailed, JobInterrupted

    count = [0]

    def resolve(_name: str) -> RunTarget:
        base = tmp_path / f"node-{count[0]}"

        def push(project_dir):
            LocalRunner(base).put_bytes((project_dir / "recoverjob.py").read_bytes(), f"{base}/project/recoverjob.py")

        node = Node(f"i-{count[0]}", "running", availability_zone="us-east-1a", lifecycle="spot")
        return RunTarget(cluster=replace(spot_cluster(), nodes=(node,)), connect=lambda: LocalRunner(base),
                         sync_project=push)

    def relauncher(_name: str, **_options):
        count[0] += 1  # the notice stays: every node is interrupted at once
        return type("Replacement", (), {"availability_zone": "us-east-1b", "instance_id": f"i-{count[0]}",
                                        "instance_type": "g5.xlarge", "market": "spot"})()

    imds.notice()
    # 75 (it saved), or 143 when the notice's SIGTERM came before the job set up its handler: both interrupted
    with pytest.raises((JobInterrupted, JobFailed)) as interrupted:
        run_with_recovery(
            "spotbox", resolve=resolve, policy=RecoveryPolicy(max_restarts=1), project_dir=recover_project,
            module=None, args=recover_job_args(400, 0.05), out=io.BytesIO(), env={"STORE": str(store)},
            poll_interval=0.05, relauncher=relauncher,
        )
    assert "not restarted: --max-restarts 1 reached" in interrupted.value.message
    assert count == [1]
    record = load_record(interrupted.value.run_id)
    assert [(a.instance_id, a.ended) for a in record.attempts] == [
        ("i-0", AttemptEnd.INTERRUPTED), ("i-1", AttemptEnd.INTERRUPTED)]
    assert len(trained(store)) < 400


def test_a_job_the_notices_sigterm_killed_before_it_saved_is_relaunched_not_failed(tmp_path, recover_project,
                                                                                    store, imds):
    """A job that had not set up its SIGTERM handler yet (or never saves) dies with 143 after a spot
    notice: its instance is going away all the same, so the attempt is an interruption."""
    import pytest

    from gpuflow.errors import JobFailed

    count = [0]

    def resolve(_name: str) -> RunTarget:
        base = tmp_path / f"node-{count[0]}"
        node = Node(f"i-{count[0]}", "running", availability_zone="us-east-1a", lifecycle="spot")
        return RunTarget(cluster=replace(spot_cluster(), nodes=(node,)), connect=lambda: LocalRunner(base),
                         sync_project=lambda _project: None)

    def relauncher(_name: str, **_options):
        count[0] += 1  # the notice stays: the new node is interrupted at once too
        return type("Replacement", (), {"availability_zone": "us-east-1b", "instance_id": f"i-{count[0]}",
                                        "instance_type": "g5.xlarge", "market": "spot"})()

    imds.notice()
    with pytest.raises(JobFailed) as ended:
        run_with_recovery(
            "spotbox", resolve=resolve, policy=RecoveryPolicy(max_restarts=1), project_dir=recover_project,
            module=None, args=["python3", "-c", "import time; time.sleep(120)"], out=io.BytesIO(),
            poll_interval=0.05, relauncher=relauncher,
        )
    assert ended.value.exit_code == 143
    assert count == [1]  # relaunched once (then --max-restarts 1 was reached), not failed at the first
    record = load_record(ended.value.run_id)
    assert [(a.instance_id, a.ended) for a in record.attempts] == [
        ("i-0", AttemptEnd.INTERRUPTED), ("i-1", AttemptEnd.INTERRUPTED)]
