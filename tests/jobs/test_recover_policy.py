"""`run --recover` decisions on one node (a LocalRunner "instance", no cloud): a job failing on
its own is not restarted unless its code is listed, --max-restarts bounds the restarts,
--max-dollars stops the run with its checkpoint saved; the options and gpuflow.toml."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gpuflow.config import RecoverySettings, read_project_config
from gpuflow.errors import ConfigError, JobFailed, JobInterrupted, UsageError
from gpuflow.jobs import load_record
from gpuflow.jobs.records import AttemptEnd
from gpuflow.jobs.recover import RecoveryPolicy, recovery_policy, run_with_recovery
from tests.jobs.recover_helpers import manifest_of, recover_job_args, recover_project, store, trained  # noqa: F401
from tests.jobs.spot_helpers import spot_target  # noqa: F401 - fixture


def _no_relaunch(*_args, **_options):
    raise AssertionError("a node was relaunched")


def _run(spot_target, recover_project, store, policy, args, said):
    return run_with_recovery(
        "spotbox", resolve=lambda _name: spot_target, policy=policy, project_dir=recover_project, module=None,
        args=args, out=io.BytesIO(), env={"STORE": str(store)}, say=said.append, poll_interval=0.05,
        relauncher=_no_relaunch,
    )


def test_a_job_failing_on_its_own_is_not_restarted(spot_target, recover_project, store):
    said: list[str] = []
    with pytest.raises(JobFailed) as failed:
        _run(spot_target, recover_project, store, RecoveryPolicy(), recover_job_args(3, 0, code=3), said)
    assert failed.value.exit_code == 3
    [record] = [load_record(failed.value.message.split()[1])]
    assert [(a.number, a.ended, a.exit_code) for a in record.attempts] == [(1, AttemptEnd.FAILED, 3)]
    assert manifest_of(record.local_dir)["attempts"][0]["ended"] == "failed"
    assert trained(store) == [0, 1, 2]
    assert not any("restart" in line for line in said)


def test_listed_exit_codes_restart_on_the_same_node_up_to_max_restarts(spot_target, recover_project, store):
    said: list[str] = []
    policy = RecoveryPolicy(max_restarts=2, restart_on_exit_codes=frozenset({3}))
    with pytest.raises(JobFailed) as failed:
        _run(spot_target, recover_project, store, policy, recover_job_args(2, 0, code=3), said)
    assert "--max-restarts 2 reached" in failed.value.message
    record = load_record(failed.value.message.split()[1])
    assert [(a.number, a.ended) for a in record.attempts] == [(i, AttemptEnd.FAILED) for i in (1, 2, 3)]
    assert len({a.instance_id for a in record.attempts}) == 1  # the same node every time
    assert sum("restarting it on the same node" in line for line in said) == 2
    log = (spot_target.connect().base_dir + f"/runs/{record.run_id}/job.log")
    text = open(log).read()
    assert text.count("failing with 3") == 3 and text.count("resumed after step 1") == 2
    assert manifest_of(record.local_dir)["attempts"][2]["number"] == 3


def test_max_dollars_stops_the_run_with_a_checkpoint_before_the_cap(spot_target, recover_project, store):
    said: list[str] = []
    # g5.xlarge at $1.006/h: the 30 s margin alone is $0.0084, so the cap is reached ~2 s in.
    policy = RecoveryPolicy(max_dollars=0.009)
    with pytest.raises(JobInterrupted) as stopped:
        _run(spot_target, recover_project, store, policy, recover_job_args(2000, 0.02), said)
    assert "before its estimated cost would pass --max-dollars 0.009" in stopped.value.message
    record = load_record(stopped.value.run_id)
    [attempt] = record.attempts
    assert attempt.ended is AttemptEnd.BUDGET and attempt.exit_code == 75
    assert attempt.cost_usd is not None and attempt.cost_usd < 0.009
    assert record.checkpoint is not None and record.checkpoint.step == trained(store)[-1]
    assert len(trained(store)) < 2000
    assert any("would pass --max-dollars 0.009" in line for line in said)
    assert manifest_of(record.local_dir)["attempts_cost_usd"] == attempt.cost_usd


def test_recovery_options_and_settings():
    assert recovery_policy() is None
    assert recovery_policy(RecoverySettings(recover=True)) == RecoveryPolicy()
    policy = recovery_policy(
        RecoverySettings(recover=True, max_restarts=2, fallback_types="g6.xlarge", restart_on_exit_codes="1"),
        fallback_types="g6.xlarge, g4dn.xlarge", max_dollars=3,
    )
    assert policy == RecoveryPolicy(2, ("g6.xlarge", "g4dn.xlarge"), frozenset({1}), 3)
    assert recovery_policy(RecoverySettings(recover=True), recover=False) is None
    for bad in ({"max_restarts": 2}, {"recover": True, "restart_on_exit_codes": "75"},
                {"recover": True, "restart_on_exit_codes": "x"}, {"recover": True, "fallback_types": "g6;rm"},
                {"recover": True, "max_dollars": 0}, {"recover": True, "max_restarts": -1}):
        with pytest.raises(UsageError):
            recovery_policy(**bad)


def test_recovery_settings_in_gpuflow_toml(tmp_path):
    (tmp_path / "gpuflow.toml").write_text('recover = true\nmax-restarts = 3\nfallback_types = "g6.xlarge"\n')
    assert read_project_config(tmp_path).recovery == RecoverySettings(recover=True, max_restarts=3, fallback_types="g6.xlarge")
    (tmp_path / "gpuflow.toml").write_text('max_dollars = "ten"\n')
    with pytest.raises(ConfigError, match="max_dollars must be of type float"):
        read_project_config(tmp_path)


def test_the_next_attempt_on_a_node_that_has_the_run_directory_continues_it_in_place(spot_target, recover_project, store):
    """`gpuflow resume RUN --on` the run's own (live) cluster: its run directory is there, so the
    job starts again in it (attempts/<n>/ on the node), as `run --resume` would."""
    said: list[str] = []
    with pytest.raises(JobFailed) as failed:
        run_with_recovery(
            "spotbox", resolve=lambda _name: spot_target, policy=RecoveryPolicy(), project_dir=recover_project,
            module=None, args=recover_job_args(5, 0), out=io.BytesIO(), env={"STORE": str(store), "FAIL_ONCE_AT": "1"},
            say=said.append, poll_interval=0.05, relauncher=_no_relaunch,
        )
    record = load_record(failed.value.message.split()[1])
    printed = io.BytesIO()
    outcome = run_with_recovery(
        "spotbox", resolve=lambda _name: spot_target, policy=RecoveryPolicy(max_restarts=0), project_dir=recover_project,
        module=None, args=list(record.args), out=printed, env=record.job_env, say=said.append, poll_interval=0.05,
        relauncher=_no_relaunch, previous=record,
    )
    assert outcome.exit_code == 0 and outcome.record.run_id == record.run_id
    assert [(a.number, a.ended) for a in outcome.record.attempts] == [(1, AttemptEnd.FAILED), (2, AttemptEnd.SUCCEEDED)]
    assert trained(store) == [0, 1, 2, 3, 4]
    run_dir = spot_target.connect().base_dir + f"/runs/{record.run_id}"
    log = open(run_dir + "/job.log").read()
    assert log.count("started") == 1 and "failing once at step 1" in log and log.rstrip().endswith("finished")
    assert printed.getvalue().decode() == log[log.index("resumed after step 1"):]
    import os

    assert os.path.isdir(run_dir + "/attempts/1")  # the failed attempt's files, moved aside on the node


def test_recover_refuses_a_run_on_several_nodes_before_starting_anything(spot_target, recover_project):
    from gpuflow.jobs import run_on_cluster

    said: list[str] = []
    with pytest.raises(UsageError) as refused:
        run_on_cluster("spotbox", resolve=lambda _name: spot_target, recovery=RecoveryPolicy(),
                       project_dir=recover_project, module=None, args=["true"], out=io.BytesIO(), say=said.append,
                       nodes=2)
    assert "--recover continues a run on one node" in refused.value.message
    assert said == [] and not (Path(spot_target.connect().base_dir) / "runs").exists()
