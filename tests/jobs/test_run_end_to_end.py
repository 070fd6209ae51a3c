"""run / logs / pull / runs / stop end to end, over a local directory and over real SSH."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from gpuflow import jobs
from gpuflow.errors import JobFailed
from tests.jobs.conftest import job_args
from tests.waiting import wait_for

pytestmark = pytest.mark.ssh


def _remote_bytes(target, path: str) -> bytes:
    runner = target.connect()
    try:
        chunks, offset = [], 0
        while chunk := runner.read_from(path, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        runner.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_streams_log_pulls_verified_outputs_and_writes_manifest(target, project, gpuflow_home):
    out = io.BytesIO()
    outcome = jobs.run(target, project_dir=project, module=None, args=job_args(20), out=out, poll_interval=0.05)

    record = outcome.record
    assert outcome.exit_code == 0 and record.status == "succeeded" and record.exit_code == 0
    remote_log = _remote_bytes(target, f"{record.remote_dir}/job.log")
    assert out.getvalue() == remote_log
    assert remote_log.count(b"line ") == 20 and b"stderr says hi" in remote_log

    local = project / "runs" / record.run_id
    assert Path(record.local_dir) == local
    assert (local / "job.log").read_bytes() == remote_log
    assert json.loads((local / "outputs" / "metrics.json").read_text()) == {"lines": 20}
    remote_checkpoint = _remote_bytes(target, f"{record.remote_dir}/outputs/checkpoints/latest.bin")
    assert _sha256(local / "outputs" / "checkpoints" / "latest.bin") == hashlib.sha256(remote_checkpoint).hexdigest()
    assert set(outcome.pull.fetched) >= {"job.log", "manifest.json", "outputs/metrics.json"}
    assert not list(local.rglob("*.gpuflow-part"))

    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["command"] == list(record.command)
    assert manifest["instance_type"] == "g5.xlarge" and manifest["region"] == "us-east-1"
    assert manifest["ami"] == "ami-0123456789abcdef0"
    assert manifest["gpu"] == "none" and manifest["gpu_driver"] == "none"  # no nvidia-smi here
    assert manifest["python"].count(".") == 2
    # The probe lists the distributions of the job's own interpreter (the "instance" is this machine).
    installed = subprocess.run(
        [record.command[0], "-c", "from importlib import metadata\n"
         "print('\\n'.join(f'{d.metadata[\"Name\"]}=={d.version}' for d in metadata.distributions()"
         " if d.metadata['Name']))"],
        capture_output=True, text=True, check=True, cwd=project,
    ).stdout.split()
    assert installed and sorted(manifest["pip_freeze"]) == sorted(set(installed))
    assert manifest["exit_code"] == 0 and manifest["ended_at"] >= manifest["job_started_at"] >= manifest["started_at"]
    # The duration is the job's own, both ends read on the instance's clock.
    job_seconds = (datetime.datetime.fromisoformat(manifest["ended_at"])
                   - datetime.datetime.fromisoformat(manifest["job_started_at"])).total_seconds()
    assert manifest["duration_seconds"] == pytest.approx(job_seconds, abs=0.05)
    assert manifest["estimated_cost_usd"] == pytest.approx(1.006 * manifest["duration_seconds"] / 3600, abs=1e-3)
    assert manifest["git"] is None  # the project is not a git repository

    job_environment = json.loads((local / "outputs" / "environment.json").read_text())
    # The test environment holds (fake) AWS credentials: none of them reaches a job.
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert not set(job_environment) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                       "AWS_SECURITY_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"}
    assert job_environment["GPUFLOW_OUTPUT_DIR"] == f"{record.remote_dir}/outputs"
    assert job_environment["GPUFLOW_RUN_ID"] == record.run_id

    stored = jobs.load_record(record.run_id)
    assert stored.status == "succeeded" and stored.cluster == "testbox"
    listed = jobs.list_runs(resolve=lambda name: target)
    assert [(status.record.run_id, str(status.status)) for status in listed] == [(record.run_id, "succeeded")]


HOSTILE = ["$(touch pwned)", "; touch pwned2", "&& echo no", "'single' \"double\"", "*", "~", "a\nb", "ü €", "`id`"]


def test_hostile_arguments_reach_the_job_literally(target, project):
    outcome = jobs.run(
        target, project_dir=project, module=None, args=job_args(1, 0, 0, *HOSTILE), out=io.BytesIO()
    )
    local = Path(outcome.record.local_dir)
    assert json.loads((local / "outputs" / "argv.json").read_text()) == HOSTILE
    runner = target.connect()
    try:
        listing = runner.run(["ls", "-a", f"{runner.base_dir}/project"]).text().split()
    finally:
        runner.close()
    assert "pwned" not in listing and "pwned2" not in listing


def test_failing_job_propagates_its_exit_code_after_pulling(target, project):
    with pytest.raises(JobFailed) as caught:
        jobs.run(target, project_dir=project, module=None, args=job_args(3, 0, 7), out=io.BytesIO())
    assert caught.value.exit_code == 7
    [record] = jobs.all_records()
    assert caught.value.run_id == record.run_id  # a caller loads the record from the error, whichever way it ended
    assert record.status == "failed" and record.exit_code == 7
    assert (Path(record.local_dir) / "outputs" / "metrics.json").is_file()
    assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: target)] == ["failed(7)"]


def test_detach_logs_pull_while_running_runs_and_stop(target, project):
    outcome = jobs.run(
        target, project_dir=project, module=None, args=job_args(10_000, 0.05), out=io.BytesIO(), detach=True,
        heartbeat_seconds=0.2,
    )
    assert outcome.detached and outcome.exit_code is None
    run_id = outcome.record.run_id
    remote_dir = outcome.record.remote_dir
    wait_for(lambda: _remote_bytes(target, f"{remote_dir}/job.log").count(b"\n") >= 5)

    # The supervisor keeps the heartbeat fresh while the job runs.
    runner = target.connect()
    try:
        heartbeat = Path(runner.base_dir) / "heartbeat"  # loopback: the "instance" is this machine
        pgid_check = runner.run_script(
            f'pid=$(cat {remote_dir}/job.pid); [ "$(ps -o pgid= -p $pid | tr -d " ")" = "$pid" ] && echo leader'
        ).text()
    finally:
        runner.close()
    assert "leader" in pgid_check  # the job leads its own process group
    # Nobody connects meanwhile: only the supervisor can move the heartbeat on.
    first = heartbeat.stat().st_mtime_ns
    wait_for(lambda: heartbeat.stat().st_mtime_ns > first, timeout=5)

    assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: target)] == ["running"]

    printed = io.BytesIO()
    assert jobs.logs(run_id, out=printed, resolve=lambda name: target) is None  # still running
    assert printed.getvalue().startswith(b"line 0000 ")

    record, report = jobs.pull(run_id, resolve=lambda name: target)
    local = Path(record.local_dir)
    assert record.status == "running"
    assert (local / "outputs" / "checkpoints" / "latest.bin").stat().st_size == 200_000
    assert "outputs/checkpoints/latest.bin" in report.fetched
    # A second pull sends only what changed.
    _record, again = jobs.pull(run_id, resolve=lambda name: target)
    assert "outputs/checkpoints/latest.bin" in again.unchanged

    started = time.monotonic()
    record, outcome_text = jobs.stop(run_id, grace_seconds=5, resolve=lambda name: target)
    assert time.monotonic() - started < 15
    assert outcome_text == "terminated"
    assert record.status == "failed" and record.exit_code == 143  # 128 + SIGTERM
    assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: target)] == ["failed(143)"]

    followed = io.BytesIO()
    assert jobs.logs(run_id, out=followed, follow=True, resolve=lambda name: target) == 143
    assert followed.getvalue() == _remote_bytes(target, f"{remote_dir}/job.log")


def test_stop_kills_a_job_that_ignores_sigterm(local_target, project):
    (project / "stubborn.py").write_text(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    outcome = jobs.run(
        local_target, project_dir=project, module=None, args=["python", "stubborn.py"], out=io.BytesIO(), detach=True
    )
    remote_dir = outcome.record.remote_dir
    wait_for(lambda: b"ready" in _remote_bytes(local_target, f"{remote_dir}/job.log"))
    record, outcome_text = jobs.stop(outcome.record.run_id, grace_seconds=1, resolve=lambda name: local_target)
    assert outcome_text == "killed"
    assert record.exit_code == 137  # 128 + SIGKILL


class _InterruptOnce(io.BytesIO):
    """An output whose first write raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def write(self, data):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(data)


def test_ctrl_c_detaches_or_stops_as_answered(local_target, project):
    asked = []
    outcome = jobs.run(
        local_target, project_dir=project, module=None, args=job_args(10_000, 0.05), out=_InterruptOnce(),
        on_interrupt=lambda record: asked.append(record.run_id) or "detach",
    )
    assert outcome.detached and asked == [outcome.record.run_id]
    assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: local_target)] == ["running"]
    jobs.stop(outcome.record.run_id, grace_seconds=2, resolve=lambda name: local_target)

    with pytest.raises(JobFailed) as caught:
        jobs.run(
            local_target, project_dir=project, module=None, args=job_args(10_000, 0.05), out=_InterruptOnce(),
            on_interrupt=lambda record: "stop",
        )
    assert caught.value.exit_code == 143


def test_dropped_ssh_connection_mid_run_loses_and_repeats_nothing(sshd, ssh_target, project, tmp_path):
    """End the server-side sessions three times while the log streams."""
    out = io.BytesIO()
    drops = []
    remote_runs = tmp_path / "ssh-instance" / "runs"  # the loopback "instance" is this machine

    def drop_repeatedly() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            log.stat().st_size > 0 for log in remote_runs.glob("*/job.log")
        ):
            time.sleep(0.02)
        for _ in range(3):
            sshd.drop_sessions()
            drops.append(time.monotonic())
            time.sleep(0.7)

    runners = []

    def connect():
        runners.append(ssh_target.connect())
        return runners[-1]

    counting_target = jobs.RunTarget(ssh_target.cluster, connect, ssh_target.sync_project)
    dropper = threading.Thread(target=drop_repeatedly)
    dropper.start()
    try:
        outcome = jobs.run(
            counting_target, project_dir=project, module=None, args=job_args(120, 0.03), out=out, poll_interval=0.05
        )
    finally:
        dropper.join()
    assert len(drops) == 3
    # Each drop forced a new connection (inside the SSH runner or through gpuflow's reconnect).
    assert sum(runner.connections_made for runner in runners) >= 4
    remote_log = _remote_bytes(ssh_target, f"{outcome.record.remote_dir}/job.log")
    assert out.getvalue() == remote_log
    numbers = [line.split()[1] for line in remote_log.decode().splitlines() if line.startswith("line ")]
    assert numbers == [f"{number:04d}" for number in range(120)]  # the job itself never noticed
    assert outcome.exit_code == 0
    assert json.loads((Path(outcome.record.local_dir) / "outputs" / "metrics.json").read_text()) == {"lines": 120}


def test_requirements_environment_is_created_once_and_reused(local_target, project):
    # `pytest` is already installed here: with --system-site-packages pip needs no network.
    (project / "requirements.txt").write_text("pytest\n")
    (project / "which.py").write_text(
        "import os, sys\nopen(os.path.join(os.environ['GPUFLOW_OUTPUT_DIR'], 'python.txt'), 'w').write(sys.executable)\n"
    )
    messages: list[str] = []
    first = jobs.run(local_target, project_dir=project, module=None, args=["python", "which.py"],
                     out=io.BytesIO(), say=messages.append)
    second = jobs.run(local_target, project_dir=project, module=None, args=["python", "which.py"],
                      out=io.BytesIO(), say=messages.append)
    digest = jobs.requirements_hash("pytest\n")
    for outcome in (first, second):
        python = (Path(outcome.record.local_dir) / "outputs" / "python.txt").read_text()
        assert f"/envs/{digest}/bin/python" in python
    assert any(message == f"reusing the environment {digest}" for message in messages)
    assert sum("preparing" in message for message in messages) == 2
    assert jobs.requirements_of(project) == "pytest\n"


def test_no_requirements_uses_the_target_interpreter(local_target, project):
    import sys

    assert jobs.prepare_environment(local_target.connect(), project) == sys.executable
    (project / "requirements.txt").write_text("# nothing yet\n\n")
    assert jobs.prepare_environment(local_target.connect(), project) == sys.executable


def test_git_commit_and_uncommitted_diff_are_in_the_manifest(local_target, project):
    import subprocess

    def git(*argv):
        subprocess.run(["git", "-C", str(project), *argv], check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})

    git("init", "-q")
    git("add", "job.py")
    git("commit", "-q", "-m", "job")
    clean = jobs.git_state(project)
    assert clean["dirty"] is False and clean["diff_sha256"] is None and len(clean["commit"]) == 40
    (project / "job.py").write_text((project / "job.py").read_text() + "\n# changed\n")
    outcome = jobs.run(local_target, project_dir=project, module=None, args=job_args(1), out=io.BytesIO())
    manifest = json.loads((Path(outcome.record.local_dir) / "manifest.json").read_text())
    assert manifest["git"]["commit"] == clean["commit"] and manifest["git"]["dirty"] is True
    assert len(manifest["git"]["diff_sha256"]) == 64


def test_a_repeated_launch_starts_nothing_twice(local_target, project):
    """After a connection drop the launch line is sent again: it must be a no-op."""
    from gpuflow.jobs import scripts as remote_scripts

    outcome = jobs.run(local_target, project_dir=project, module=None, args=job_args(3, 0.05), out=io.BytesIO(),
                       detach=True)
    remote_dir = outcome.record.remote_dir
    runner = local_target.connect()
    pid_before = runner.read_from(f"{remote_dir}/job.pid")
    runner.run_script(remote_scripts.launch_command(remote_dir))
    exit_code, _offset = jobs.follow_log(
        jobs.Connection(local_target, runner, 10, jobs.quiet), remote_dir, io.BytesIO(), poll_interval=0.05
    )
    assert exit_code == 0
    assert runner.read_from(f"{remote_dir}/job.pid") == pid_before
    assert _remote_bytes(local_target, f"{remote_dir}/job.log").count(b"line 0000") == 1


@pytest.mark.parametrize(
    ("module", "args", "expected_tail"),
    [
        ("training.cifar10_cnn", ["--epochs", "2"], ["--epochs", "2", "--output", "/r/outputs"]),
        ("training.cifar10_cnn", ["--output", "mine"], ["--output", "mine"]),
        ("training.cifar10_cnn", ["--output=mine"], ["--output=mine"]),
        ("mypackage.train", ["--epochs", "2"], ["--epochs", "2"]),
    ],
)
def test_training_modules_get_the_run_outputs_dir_unless_given(module, args, expected_tail):
    argv = jobs.build_job_argv(python="py", module=module, args=args, output_dir="/r/outputs")
    assert argv[:3] == ["py", "-m", module] and argv[3:] == expected_tail


@pytest.mark.parametrize("module", ["os; rm -rf /", "-m", ".relative", "a b", "a..b", "9lives.train"])
def test_module_names_are_checked(module):
    from gpuflow.errors import UsageError

    with pytest.raises(UsageError):
        jobs.build_job_argv(python="py", module=module, args=[], output_dir="/r")


def test_instance_python_is_found_over_ssh_and_can_be_configured(ssh_connect, project, tmp_path):
    import sys

    runner = ssh_connect()
    try:
        found = jobs.base_python(runner, project)
        assert found.startswith("/") and found.rsplit("/", 1)[-1].startswith("python3")  # `command -v python3`
        fake = tmp_path / "bin" / "my python"
        fake.parent.mkdir()
        fake.symlink_to(sys.executable)
        (project / "gpuflow.toml").write_text(f"remote_python = {str(fake)!r}\n".replace("'", '"'))
        assert jobs.base_python(runner, project) == str(fake)
    finally:
        runner.close()


def test_runs_on_a_vanished_or_unreachable_cluster(local_target, project):
    from gpuflow.errors import ClusterNotFound, UnreachableHost

    outcome = jobs.run(local_target, project_dir=project, module=None, args=job_args(10_000, 0.05), out=io.BytesIO(),
                       detach=True)

    def unreachable(name):
        raise UnreachableHost("network down")

    def vanished(name):
        raise ClusterNotFound(f"no cluster named {name!r}")

    assert [str(status.status) for status in jobs.list_runs(resolve=unreachable)] == ["unreachable"]
    assert jobs.load_record(outcome.record.run_id).status == "running"  # not concluded from a network blip
    assert [str(status.status) for status in jobs.list_runs(resolve=vanished)] == ["lost"]
    jobs.stop(outcome.record.run_id, grace_seconds=2, resolve=lambda name: local_target)


def test_manifest_duration_ignores_a_skewed_laptop_clock():
    # The laptop's clock is an hour ahead of the instance's: the job's 90 s on the
    # instance stay 90 s, and the cost is that of 90 s.
    manifest = {"started_at": "2026-11-28T11:00:00+00:00", "price_per_hour": 1.2, "instance_count": 2}
    finished = jobs.finish_manifest(
        manifest, job_started_at="2026-11-28T10:00:05+00:00", ended_at="2026-11-28T10:01:35+00:00", exit_code=0
    )
    assert finished["duration_seconds"] == 90.0
    assert finished["estimated_cost_usd"] == pytest.approx(1.2 * 2 * 90 / 3600)
    assert finished["started_at"] == manifest["started_at"] and finished["job_started_at"] == "2026-11-28T10:00:05+00:00"


def test_a_job_that_never_started_has_no_duration_or_cost():
    manifest = {"started_at": "2026-11-28T10:00:00+00:00", "price_per_hour": 1.2}
    finished = jobs.finish_manifest(manifest, job_started_at=None, ended_at="2026-11-28T10:00:01+00:00", exit_code=127)
    assert finished["exit_code"] == 127 and finished["duration_seconds"] is None and finished["estimated_cost_usd"] is None


def test_the_manifest_carries_the_chosen_dlami(tmp_path):
    from gpuflow.records import Cluster

    cluster = Cluster(
        name="c", region="us-east-1", instance_type="g5.xlarge", ami="ami-00000000000000018",
        ami_name="Deep Learning OSS Nvidia Driver AMI GPU TensorFlow 2.18 (Ubuntu 22.04) 20250101",
        ami_parameter="/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-tensorflow-2.18-ubuntu-22.04/latest/ami-id",
    )
    record = jobs.RunRecord(run_id="r1", cluster="c", base_dir="/b", remote_dir="/b/runs/r1", command=("true",),
                            project_dir=str(tmp_path), local_dir=str(tmp_path / "runs" / "r1"),
                            started_at="2026-11-30T10:00:00+00:00")
    manifest = jobs.build_manifest(record=record, cluster=cluster, project_dir=tmp_path, environment={})
    assert (manifest["ami"], manifest["ami_name"], manifest["ami_parameter"]) == (
        cluster.ami, cluster.ami_name, cluster.ami_parameter)
