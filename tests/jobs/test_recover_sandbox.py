"""`gpuflow run --up --sandbox --spot --recover --down` against the in-process sandbox cloud: the
node is terminated under the job twice (moto termination + its processes killed and its
directory discarded, as the sandbox's terminate does); gpuflow relaunches a node each time and
continues the SAME run from its checkpoint; the manifest lists 3 attempts; nothing is left.
Ctrl-C in the middle of a relaunch leaves nothing either.

Until the durable store is merged, the stand-in job keeps its checkpoint in a directory
outside the node (tests/jobs/recover_helpers.py) — only in this test."""

from __future__ import annotations

import io
import threading
import time

import pytest

from gpuflow import clusters, jobs
from gpuflow.clusters.relaunch import REPLACED_NODES
from gpuflow.provisioner import open_provisioner
from gpuflow.testing.leaks import cloud_leftovers, job_pids, sandbox_directories
from infra.sandbox import in_process_sandbox
from tests.jobs.recover_helpers import manifest_of, recover_job_args, recover_project, step_count, store, trained  # noqa: F401
from tests.jobs.spot_helpers import wait_until

pytestmark = pytest.mark.slow


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def _leftovers(home) -> list:
    import boto3

    cloud = cloud_leftovers(lambda service, region: boto3.client(service, region_name=region), ["us-east-1"])
    return [item.describe() for item in cloud] + [str(path) for path in sandbox_directories(home)] + job_pids(home)


def _head(name: str) -> str | None:
    try:
        cluster = clusters.get_cluster(name)
    except Exception:  # noqa: BLE001 - not up yet
        return None
    return cluster.nodes[0].instance_id if cluster.nodes and cluster.nodes[0].state == "running" else None


def _interrupt_at(name: str, store, steps: tuple[int, ...], done: list) -> None:
    """Terminate the cluster's head node once the job has trained each number of ``steps``."""
    seen: set[str] = set()
    try:
        for count in steps:
            wait_until(lambda: step_count(store) >= count and (_head(name) or "") not in seen | {""}, 60, f"{count} steps")
            # What a node printed in its last poll interval dies with it (the log is streamed, not
            # uploaded, without the durable store): give the follow loop (0.5 s polls) time to have
            # streamed the steps so far, so the test can check the one log holds every attempt.
            time.sleep(1)
            instance_id = _head(name)
            seen.add(instance_id)
            open_provisioner("us-east-1", sandbox=True).terminate([instance_id])
            done.append(instance_id)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        done.append(exc)


def test_recover_relaunches_twice_and_the_run_continues_from_its_checkpoint(
    recover_project, store, monkeypatch, capfd, gpuflow_home
):
    monkeypatch.chdir(recover_project)
    done: list = []
    with in_process_sandbox():
        thread = threading.Thread(target=_interrupt_at, args=("rbox", store, (3, 7), done), daemon=True)
        thread.start()
        code = cli(["run", "--up", "--sandbox", "--spot", "--down", "--recover", "rbox", "--env", f"STORE={store}",
                    "--", *recover_job_args(24, 0.3)])
        thread.join(30)
        captured = capfd.readouterr()
        assert code == 0, captured.err
        assert len(done) == 2 and all(isinstance(item, str) for item in done), done
        assert _leftovers(gpuflow_home) == []
    [record] = jobs.all_records()
    assert sorted(set(trained(store))) == list(range(24))  # every step, continued, not started over
    assert len(trained(store)) <= 24 + 2  # at most the step in flight is trained again per interruption
    attempts = manifest_of(record.local_dir)["attempts"]
    assert [attempt["number"] for attempt in attempts] == [1, 2, 3]
    assert [attempt["ended"] for attempt in attempts] == ["instance-gone", "instance-gone", "succeeded"]
    assert [attempt["instance_id"] for attempt in attempts[:2]] == done
    assert len({attempt["instance_id"] for attempt in attempts}) == 3
    assert all(attempt["market"] == "spot" for attempt in attempts)
    assert attempts[1]["availability_zone"] != attempts[0]["availability_zone"]  # another zone first
    log = (record.local_dir + "/job.log")
    text = open(log).read()
    assert text.count("resumed after step") == 2 and text.startswith("started") and text.rstrip().endswith("finished")
    assert captured.out == text  # one stream, one log
    assert captured.err.count("relaunching a g5.xlarge node") == 2
    assert "resumed at epoch 0 step" in captured.err or "started again" in captured.err


def test_ctrl_c_in_the_middle_of_a_relaunch_leaves_nothing(recover_project, store, monkeypatch, gpuflow_home):
    monkeypatch.chdir(recover_project)
    done: list = []
    relaunching: list[str] = []

    def say(message: str) -> None:
        if "relaunching" in message:
            relaunching.append(message)
        if relaunching and message.startswith("waiting:"):  # the new node is launched, not ready yet
            raise KeyboardInterrupt

    with in_process_sandbox():
        spec = clusters.resolve_spec("cbox", {"sandbox": True, "spot": True}, project_dir=recover_project)
        thread = threading.Thread(target=_interrupt_at, args=("cbox", store, (3,), done), daemon=True)
        thread.start()
        with pytest.raises(KeyboardInterrupt):
            jobs.run_on_cluster(
                "cbox", project_dir=recover_project, module=None, args=recover_job_args(50, 0.1), out=io.BytesIO(),
                up_spec=spec, down=True, say=say, env={"STORE": str(store)}, poll_interval=0.05, liveness_interval=0.5,
                recovery=jobs.recovery_policy(recover=True),
            )
        thread.join(30)
        assert relaunching
        assert _leftovers(gpuflow_home) == []
        import boto3

        states = [i["State"]["Name"] for r in boto3.client("ec2", "us-east-1").describe_instances()["Reservations"]
                  for i in r["Instances"]]
        assert states == ["terminated", "terminated"]  # the first node and the half-launched replacement
    [record] = jobs.all_records()
    assert [attempt.ended.value for attempt in record.attempts] == ["instance-gone"]


def test_relaunch_falls_back_to_other_types_then_on_demand(recover_project, gpuflow_home):
    from gpuflow.clusters.relaunch import relaunch
    from gpuflow.errors import CapacityError

    tried: list[tuple[tuple[str, ...], str, tuple]] = []

    class NoSpotCapacity:
        """The sandbox's provisioner, whose spot fleets find no capacity (moto never lacks any)."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def launch_fleet(self, template, step, request, *, on_attempt=None):
            tried.append((tuple(dict.fromkeys(pool.instance_type for pool in step.pools)), step.market,
                          tuple(pool.availability_zone for pool in step.pools)))
            if step.market == "spot":
                raise CapacityError(f"no spot capacity for {step}")
            return self.inner.launch_fleet(template, step, request, on_attempt=on_attempt)

    def factory(region, *, profile=None, sandbox=False):
        return NoSpotCapacity(open_provisioner(region, profile=profile, sandbox=sandbox))

    with in_process_sandbox():
        spec = clusters.resolve_spec("fbox", {"sandbox": True, "spot": True, "spot_fallback": True},
                                     project_dir=recover_project)
        first = clusters.up(spec)
        try:
            zone = first.nodes[0].availability_zone
            replacement = relaunch("fbox", fallback_types=("g4dn.xlarge",), avoid_zone=zone, provisioner_factory=factory)
            assert [(kinds, market) for kinds, market, _zones in tried] == [  # one EC2 Fleet call per step
                (("g5.xlarge",), "spot"), (("g5.xlarge", "g4dn.xlarge"), "spot"),
                (("g5.xlarge", "g4dn.xlarge"), "on-demand")]
            assert zone not in tried[0][2] and zone in tried[1][2]  # the interrupted zone after the others
            assert (replacement.instance_type, replacement.market) == ("g5.xlarge", "on-demand")
            cluster = clusters.get_cluster("fbox")
            assert [node.instance_id for node in cluster.nodes] == [replacement.instance_id]
            replaced = clusters._store().get("fbox")[REPLACED_NODES]  # every node the cluster ever had is named
            assert [node["instance_id"] for node in replaced] == [first.nodes[0].instance_id]
            import boto3

            ec2 = boto3.client("ec2", "us-east-1")
            [old] = [i for r in ec2.describe_instances(InstanceIds=[first.nodes[0].instance_id])["Reservations"]
                     for i in r["Instances"]]
            assert old["State"]["Name"] == "terminated"  # the interrupted node never bills beside its replacement
        finally:
            clusters.down("fbox")
        assert _leftovers(gpuflow_home) == []


def test_resume_up_continues_a_run_whose_cluster_is_gone(recover_project, store, monkeypatch, capfd, gpuflow_home):
    monkeypatch.chdir(recover_project)
    with in_process_sandbox():
        code = cli(["run", "--up", "--sandbox", "--down", "gbox", "--env", f"STORE={store}", "--env", "FAIL_ONCE_AT=2",
                    "--", *recover_job_args(6, 0.05)])
        assert code == 3, capfd.readouterr().err
        [record] = jobs.all_records()
        capfd.readouterr()
        assert cli(["resume", record.run_id, "--on", "gbox"]) != 0  # its cluster is gone: --up says how
        assert "add --up to launch it" in capfd.readouterr().err
        code = cli(["resume", record.run_id, "--up", "--sandbox", "--down"])
        captured = capfd.readouterr()
        assert code == 0, captured.err
        assert _leftovers(gpuflow_home) == []
    [resumed] = jobs.all_records()
    assert resumed.run_id == record.run_id and resumed.started_at == record.started_at
    assert trained(store) == [0, 1, 2, 3, 4, 5]  # continued after step 2, not started over
    assert [(a.number, a.ended.value, a.exit_code) for a in resumed.attempts] == [(1, "failed", 3), (2, "succeeded", 0)]
    text = open(resumed.local_dir + "/job.log").read()
    assert text.startswith("started") and "failing once at step 2" in text and "resumed after step 2" in text
    assert captured.out == text[text.index("resumed after step 2"):]  # only what is new is printed
