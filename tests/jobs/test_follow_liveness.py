"""Following a run never hangs and never loses the job's outcome.

* The follow loop (``run``, ``logs -f``) checks the job by identity and the
  instance by its state: a job that vanished without an exit code, a deleted
  run directory or a terminated instance end it with status ``lost`` and the
  reason, within a bounded time.
* The job's outcome (exit code, start time, Python, duration) is recorded
  before the pull, so a refused pull still reports and records it.

Each test runs against a local directory and over the loopback OpenSSH server;
the "instance" is this machine, so a test can kill the job's processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from gpuflow import jobs, procs
from gpuflow.errors import JobFailed, RunLost, UnsafePath
from gpuflow.transport.ssh import Backoff, SSHRunner
from tests.jobs.conftest import job_args
from tests.waiting import wait_for

pytestmark = pytest.mark.ssh

FAST = 0.3  # liveness_interval for these tests: a dead job is noticed within a second or two


def _bounded(call, timeout: float = 60.0):
    """``call()`` in a thread: the test fails (instead of hanging the suite) if it does not return."""
    result: dict = {}

    def body() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # handed to the test below
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still following {timeout:g}s after the job vanished"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _pid(remote_dir: str, name: str) -> int:
    path = Path(remote_dir) / name  # loopback: the "instance" is this machine
    wait_for(lambda: path.is_file() and path.read_text().strip() != "")
    return int(path.read_text().split()[0])


def _kill_job_and_supervisor(remote_dir: str) -> None:
    """Both die at once (OOM killer, a crash of the node's agent): nobody writes exit_code."""
    supervisor, job = _pid(remote_dir, "supervisor.pid"), _pid(remote_dir, "job.pid")
    log = Path(remote_dir) / "job.log"
    wait_for(lambda: log.is_file() and log.stat().st_size > 0)  # it has said something first
    os.kill(supervisor, signal.SIGKILL)
    os.killpg(job, signal.SIGKILL)
    wait_for(lambda: procs.identity(supervisor) is None and procs.identity(job) is None)  # dead


def _detached(target, project, **options) -> jobs.RunOutcome:
    return jobs.run(target, project_dir=project, module=None, args=job_args(100_000, 0.05), out=io.BytesIO(),
                    detach=True, **options)


def test_logs_follow_ends_lost_when_the_job_and_its_supervisor_die_together(target, project):
    outcome = _detached(target, project)
    run_id = outcome.record.run_id
    _kill_job_and_supervisor(outcome.record.remote_dir)

    printed = io.BytesIO()
    with pytest.raises(RunLost) as caught:
        _bounded(lambda: jobs.logs(run_id, out=printed, follow=True, resolve=lambda name: target,
                                   liveness_interval=FAST))
    assert caught.value.exit_code == 9
    assert f"run {run_id} is lost" in caught.value.message
    assert "process is gone without an exit code" in caught.value.message
    assert printed.getvalue().startswith(b"line 0000 ")  # what the job wrote was still printed
    record = jobs.load_record(run_id)
    assert record.status == "lost" and "without an exit code" in record.lost_reason
    assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: target)] == ["lost"]


def test_run_ends_lost_when_the_job_vanishes_mid_stream_and_keeps_what_it_wrote(target, project):
    def kill_once_streaming() -> None:
        wait_for(lambda: any(log.stat().st_size > 0 for log in Path(base).glob("runs/*/job.log")), timeout=60)
        [run_dir] = Path(base).glob("runs/*")
        _kill_job_and_supervisor(str(run_dir))

    runner = target.connect()
    base = runner.base_dir
    runner.close()
    killer = threading.Thread(target=kill_once_streaming, daemon=True)
    killer.start()
    out = io.BytesIO()
    with pytest.raises(RunLost) as caught:
        _bounded(lambda: jobs.run(target, project_dir=project, module=None, args=job_args(100_000, 0.05), out=out,
                                  liveness_interval=FAST, poll_interval=0.05))
    killer.join(5)
    [record] = jobs.all_records()
    assert record.status == "lost" and record.exit_code is None
    assert "without an exit code" in caught.value.message
    # The log so far and the outputs were pulled: a crash still leaves its checkpoint.
    local = Path(record.local_dir)
    assert (local / "job.log").read_bytes().startswith(out.getvalue()[:100]) and out.getvalue()
    assert (local / "outputs" / "checkpoints" / "latest.bin").stat().st_size == 200_000


def test_a_live_job_is_not_lost_while_it_prints_nothing(local_target, project):
    """Silence is not death: a job sleeping without output is still followed to its end."""
    (project / "quiet.py").write_text("import time\ntime.sleep(2.5)\nprint('done', flush=True)\n")
    outcome = _bounded(lambda: jobs.run(local_target, project_dir=project, module=None, args=["python", "quiet.py"],
                                        out=io.BytesIO(), liveness_interval=FAST))
    assert outcome.exit_code == 0 and outcome.record.status == "succeeded"


def test_follow_ends_lost_when_the_run_directory_is_deleted(local_target, project):
    target = local_target
    outcome = _detached(target, project)
    _kill_job_and_supervisor(outcome.record.remote_dir)
    shutil.rmtree(outcome.record.remote_dir)
    with pytest.raises(RunLost) as caught:
        _bounded(lambda: jobs.logs(outcome.record.run_id, out=io.BytesIO(), follow=True, resolve=lambda name: target,
                                   liveness_interval=FAST))
    assert f"its run directory {outcome.record.remote_dir} is gone" in caught.value.message
    assert jobs.load_record(outcome.record.run_id).status == "lost"


def test_follow_ends_lost_when_the_instance_is_terminated(local_target, project):
    """The sandbox's `down` (or EC2 terminating the instance): processes and disk go.
    EC2 says the instance is no longer running: that is the reason given."""
    terminated = jobs.RunTarget(local_target.cluster, local_target.connect, local_target.sync_project,
                                instance_alive=lambda: False)
    outcome = _detached(local_target, project)
    _kill_job_and_supervisor(outcome.record.remote_dir)
    runner = local_target.connect()
    base = runner.base_dir
    shutil.rmtree(base)  # the instance's disk went with it
    with pytest.raises(RunLost) as caught:
        _bounded(lambda: jobs.logs(outcome.record.run_id, out=io.BytesIO(), follow=True,
                                   resolve=lambda name: terminated, liveness_interval=FAST))
    assert "its instance" in caught.value.message and "is no longer running" in caught.value.message
    assert not Path(base).exists()  # following never re-creates the vanished instance's directory


def test_follow_ends_lost_when_the_instance_goes_away_under_the_ssh_connection(sshd, ssh_target, project):
    """The SSH server disappears for good (the instance was terminated) while the
    log is followed: gpuflow asks EC2 instead of retrying, and gives up at once."""
    outcome = _detached(ssh_target, project)
    terminated_now = threading.Event()
    asked_after = []

    def alive() -> bool:  # "EC2": running until the server goes away, terminated after
        if terminated_now.is_set():
            asked_after.append(1)
        return not terminated_now.is_set()

    first = ssh_target.connect()
    pinned = first.target  # the same server, host key and base directory
    base_dir = first.base_dir
    first.close()

    def connect() -> SSHRunner:  # wired to "EC2" as remote.runner_for wires a real cluster's runner
        return SSHRunner(pinned, base_dir=base_dir, backoff=Backoff(retries=8, initial=0.1, maximum=1.0),
                         instance_alive=alive)

    terminated = jobs.RunTarget(ssh_target.cluster, connect, ssh_target.sync_project, instance_alive=alive)

    def stop_server_once_streaming() -> None:
        wait_for(lambda: printed.getvalue().count(b"\n") >= 3, timeout=60)
        terminated_now.set()
        sshd.stop()

    printed = io.BytesIO()
    stopper = threading.Thread(target=stop_server_once_streaming, daemon=True)
    stopper.start()
    try:
        with pytest.raises(RunLost) as caught:
            _bounded(lambda: jobs.logs(outcome.record.run_id, out=printed, follow=True,
                                       resolve=lambda name: terminated, liveness_interval=FAST, poll_interval=0.05))
        assert terminated_now.is_set() and printed.getvalue().startswith(b"line 0000 ")  # it was following
        assert "is no longer running" in caught.value.message and asked_after
        assert jobs.load_record(outcome.record.run_id).status == "lost"
    finally:
        stopper.join(5)
        os.killpg(_pid(outcome.record.remote_dir, "job.pid"), signal.SIGKILL)
        os.kill(_pid(outcome.record.remote_dir, "supervisor.pid"), signal.SIGKILL)


def test_a_reused_pid_is_not_taken_for_the_job(local_target, project):
    """The job's pid now names a live process group leader that is not the recorded
    process (the pid was reused): the job is gone, whatever holds its pid now."""
    outcome = _detached(local_target, project)
    remote_dir = outcome.record.remote_dir
    runner = local_target.connect()
    assert jobs.job_liveness(runner, remote_dir).job == "alive"
    # The wall clock stepped an hour forward since the job started (NTP at boot): its pid
    # files look older than its processes, but their markers still name them.
    for name in ("job.pid", "supervisor.pid"):
        path = Path(remote_dir) / name
        os.utime(path, (path.stat().st_mtime - 3600, path.stat().st_mtime - 3600))
    liveness = jobs.job_liveness(runner, remote_dir)
    assert (liveness.job, liveness.supervisor) == ("alive", "alive")
    _kill_job_and_supervisor(remote_dir)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)  # leads its own group, like the job did
    try:
        for name in ("job", "supervisor"):  # the kernel handed the pid to the stranger; the record names the old process
            identity = (Path(remote_dir) / f"{name}.proc").read_text().split(" ", 1)[1]
            (Path(remote_dir) / f"{name}.proc").write_text(f"{stranger.pid} {identity}")
            (Path(remote_dir) / f"{name}.pid").write_text(f"{stranger.pid}\n")
        liveness = jobs.job_liveness(runner, remote_dir)
        assert (liveness.job, liveness.supervisor) == ("gone", "gone")
        with pytest.raises(RunLost):
            _bounded(lambda: jobs.logs(outcome.record.run_id, out=io.BytesIO(), follow=True,
                                       resolve=lambda name: local_target, liveness_interval=FAST))
        assert stranger.poll() is None  # and nobody touched the stranger
    finally:
        stranger.kill()
        stranger.wait()


# --------------------------------------------------------------------------- one proof for every command


def _run_status(runner, remote_dir: str) -> dict:
    """What `gpuflow runs` (and the stop before teardown) learn of one run directory."""
    argv = [runner.python, "-I", "-S", "-c", jobs.scripts.RUN_STATUS_PY, remote_dir]
    return json.loads(runner.run(argv).stdout)[remote_dir]


def _kill_marked(remote_dir: str) -> None:
    for pid in procs.marked(remote_dir, exact=True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_jobs_child_left_in_its_group_is_the_job_for_follow_runs_and_stop(local_target, project):
    """The job's leader and its supervisor die; a child the job started lives on in
    the job's process group with the run's marker.  Following, `runs` and `stop`
    all take it for the job: none calls it lost while another would signal it."""
    (project / "forks.py").write_text(
        "import subprocess, time\nsubprocess.Popen(['sleep', '120'])\nprint('forked', flush=True)\ntime.sleep(120)\n"
    )
    outcome = jobs.run(local_target, project_dir=project, module=None, args=["python", "forks.py"],
                       out=io.BytesIO(), detach=True)
    remote_dir, run_id = outcome.record.remote_dir, outcome.record.run_id
    try:
        supervisor, job = _pid(remote_dir, "supervisor.pid"), _pid(remote_dir, "job.pid")
        wait_for(lambda: len(procs.marked(remote_dir, exact=True)) == 2)  # the job and its child
        [child] = [pid for pid in procs.marked(remote_dir, exact=True) if pid != job]
        os.kill(supervisor, signal.SIGKILL)  # not the group: the child stays
        os.kill(job, signal.SIGKILL)
        wait_for(lambda: procs.identity(job) is None and procs.identity(supervisor) is None)

        runner = local_target.connect()
        liveness = jobs.job_liveness(runner, remote_dir)
        assert (liveness.job, liveness.supervisor, liveness.alive) == ("alive", "gone", True)
        assert _run_status(runner, remote_dir)["alive"] is True
        assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: local_target)] == ["running"]

        record, stopped = jobs.stop(run_id, grace_seconds=5, resolve=lambda name: local_target)
        assert stopped == "terminated"  # the child was what stop signalled
        wait_for(lambda: procs.identity(child) is None)
        assert record.status == "lost"
        liveness = jobs.job_liveness(runner, remote_dir)
        assert (liveness.job, liveness.alive) == ("gone", False) and _run_status(runner, remote_dir)["alive"] is False
    finally:
        _kill_marked(remote_dir)


def test_runs_and_follow_wait_for_a_supervisor_still_to_record_the_exit_code(local_target, project):
    """The job has ended; its supervisor (stopped here) has yet to write the exit
    code: for `runs`, the follow loop and `stop` the run is running, not lost, and
    its outcome is recorded once the supervisor writes it."""
    outcome = _detached(local_target, project)
    remote_dir = outcome.record.remote_dir
    supervisor, job = _pid(remote_dir, "supervisor.pid"), _pid(remote_dir, "job.pid")
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.killpg(job, signal.SIGKILL)
        wait_for(lambda: procs.identity(job) is None)  # dead (a zombie its stopped supervisor cannot reap)
        runner = local_target.connect()
        liveness = jobs.job_liveness(runner, remote_dir)
        assert (liveness.job, liveness.supervisor, liveness.alive) == ("gone", "alive", True)
        assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: local_target)] == ["running"]
        record, stopped = jobs.stop(outcome.record.run_id, grace_seconds=0, resolve=lambda name: local_target)
        assert stopped == "gone" and record.status == "running"  # nothing left to signal, but not lost
    finally:
        os.kill(supervisor, signal.SIGCONT)
    wait_for(lambda: (Path(remote_dir) / "exit_code").exists())
    assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: local_target)] == ["failed(137)"]


def test_a_supervisor_yet_to_start_its_job_is_alive_for_follow_and_runs(local_target):
    """Between the supervisor's start and the job's, only the supervisor's record exists."""
    runner = local_target.connect()
    run_dir = Path(runner.base_dir) / "runs" / "20260101-000000-abcd"
    run_dir.mkdir(parents=True)
    supervisor = subprocess.Popen(["sleep", "60"], start_new_session=True)  # leads its own session, as it does
    try:
        assert procs.record(str(run_dir / "supervisor.proc"), supervisor.pid)
        (run_dir / "supervisor.pid").write_text(f"{supervisor.pid}\n")
        liveness = jobs.job_liveness(runner, str(run_dir))
        assert (liveness.job, liveness.supervisor, liveness.alive) == ("none", "alive", True)
        assert _run_status(runner, str(run_dir))["alive"] is True
    finally:
        supervisor.kill()
        supervisor.wait()
    liveness = jobs.job_liveness(runner, str(run_dir))
    assert (liveness.job, liveness.supervisor, liveness.alive) == ("none", "gone", False)
    assert _run_status(runner, str(run_dir))["alive"] is False
    assert "never started the job" in jobs.lost_reason(liveness, str(run_dir))


# --------------------------------------------------------------------------- the outcome survives a refused pull

_FAILS_WITH_A_SYMLINK = (
    "import os, sys\n"
    "out = os.environ['GPUFLOW_OUTPUT_DIR']\n"
    "open(os.path.join(out, 'model.bin'), 'wb').write(b'weights')\n"
    "os.symlink('/etc/passwd', os.path.join(out, 'passwd-link'))\n"
    "print('bad job', flush=True)\n"
    "sys.exit(int(sys.argv[1]))\n"
)


def _manifest(record) -> dict:
    return json.loads((Path(record.local_dir) / "manifest.json").read_text())


def _assert_outcome_recorded(record, exit_code: int) -> None:
    assert record.exit_code == exit_code and record.status == ("succeeded" if exit_code == 0 else "failed")
    assert record.job_started_at and record.ended_at and record.duration_seconds is not None
    assert record.python == platform.python_version()
    manifest = _manifest(record)
    assert manifest["exit_code"] == exit_code
    assert manifest["job_started_at"] == record.job_started_at and manifest["ended_at"] == record.ended_at
    assert manifest["python"] == platform.python_version()
    assert manifest["duration_seconds"] is not None and manifest["estimated_cost_usd"] is not None


def _run_leaving_a_symlink(target, project, code: int, error: type):
    """Run the job that leaves a symlink in its outputs and exits ``code``: the error raised, and the run's record."""
    (project / "bad.py").write_text(_FAILS_WITH_A_SYMLINK)
    with pytest.raises(error) as caught:
        jobs.run(target, project_dir=project, module=None, args=["python", "bad.py", str(code)], out=io.BytesIO())
    [record] = jobs.all_records()
    return caught.value, record


def test_a_failed_job_is_reported_and_recorded_even_when_the_pull_refuses(target, project):
    failure, record = _run_leaving_a_symlink(target, project, 3, JobFailed)
    # The job's failure decides the exit code; the refusal is reported with it.
    assert failure.exit_code == 3
    assert f"run {record.run_id} failed with exit code 3" in failure.message
    assert "refused 1 remote entry" in failure.message and "passwd-link" in failure.message
    _assert_outcome_recorded(record, 3)
    assert (Path(record.local_dir) / "outputs" / "model.bin").read_bytes() == b"weights"
    assert not os.path.lexists(Path(record.local_dir) / "outputs" / "passwd-link")

    # A later `pull` refuses again (exit 7), says how the job ended, and completes the manifest.
    manifest_path = Path(record.local_dir) / "manifest.json"
    manifest_path.write_text(json.dumps({**_manifest(record), "exit_code": None, "job_started_at": None,
                                         "python": None, "duration_seconds": None}))
    jobs.save_record(jobs.RunRecord(**{**record.to_dict(), "command": tuple(record.command), "status": "running",
                                       "exit_code": None, "job_started_at": None, "python": None,
                                       "duration_seconds": None}))
    with pytest.raises(UnsafePath) as refused:
        jobs.pull(record.run_id, resolve=lambda name: target)
    assert refused.value.exit_code == 7
    assert "job failed(3)" in refused.value.message and "passwd-link" in refused.value.message
    _assert_outcome_recorded(jobs.load_record(record.run_id), 3)


def test_a_succeeded_job_whose_pull_refuses_exits_7_and_says_the_job_succeeded(local_target, project):
    refusal, record = _run_leaving_a_symlink(local_target, project, 0, UnsafePath)
    assert refusal.exit_code == 7
    assert f"run {record.run_id} succeeded" in refusal.message and "passwd-link" in refusal.message
    _assert_outcome_recorded(record, 0)


def test_the_outcome_is_recorded_when_the_pull_cannot_reach_the_instance(local_target, project, monkeypatch):
    """Whatever stops the pull, the job's result is already recorded and reported."""
    from gpuflow.errors import UnreachableHost

    def unreachable(*args, **kwargs):
        raise UnreachableHost("network down")

    monkeypatch.setattr(jobs.pulling, "pull_files", unreachable)
    with pytest.raises(JobFailed) as caught:
        jobs.run(local_target, project_dir=project, module=None, args=job_args(2, 0, 5), out=io.BytesIO())
    [record] = jobs.all_records()
    assert caught.value.exit_code == 5
    assert "failed with exit code 5" in caught.value.message and "network down" in caught.value.message
    assert record.status == "failed" and record.exit_code == 5 and record.job_started_at

    with pytest.raises(UnreachableHost) as unreachable_error:  # a job that succeeded: the pull's code, and why
        jobs.run(local_target, project_dir=project, module=None, args=job_args(2), out=io.BytesIO())
    succeeded = next(record for record in jobs.all_records() if record.exit_code == 0)
    assert unreachable_error.value.exit_code == 6
    assert f"run {succeeded.run_id} succeeded, but pulling its files failed: network down" in (
        unreachable_error.value.message
    )
    assert succeeded.status == "succeeded" and succeeded.job_started_at


# --------------------------------------------------------------------------- every other wait ends too


def test_a_job_never_seen_to_start_is_recorded_lost(local_target, project, monkeypatch):
    """The start wait is bounded; when it runs out the record says lost, and why, not 'running'."""
    from gpuflow.jobs import scripts as remote_scripts
    from gpuflow.errors import RemoteCommandFailed

    monkeypatch.setattr(remote_scripts, "render_supervisor", lambda **_kwargs: "#!/bin/sh\nexit 0\n")  # dies at once
    monkeypatch.setattr(jobs.start, "START_SECONDS", 1)
    with pytest.raises(RemoteCommandFailed, match="did not start within 1s"):
        _bounded(lambda: jobs.run(local_target, project_dir=project, module=None, args=job_args(1), out=io.BytesIO()))
    [record] = jobs.all_records()
    assert record.status == "lost" and "not seen to start" in record.lost_reason


def test_stopping_a_vanished_job_records_it_lost(local_target, project):
    outcome = _detached(local_target, project)
    _kill_job_and_supervisor(outcome.record.remote_dir)
    record, stopped = _bounded(lambda: jobs.stop(outcome.record.run_id, grace_seconds=0,
                                                 resolve=lambda name: local_target))
    assert stopped == "gone"
    assert record.status == "lost" and "without an exit code" in record.lost_reason
    assert jobs.load_record(outcome.record.run_id).status == "lost"


def test_following_a_finished_run_whose_directory_is_gone_keeps_its_outcome(local_target, project):
    from gpuflow.errors import NotFound

    finished = jobs.run(local_target, project_dir=project, module=None, args=job_args(2), out=io.BytesIO())
    shutil.rmtree(finished.record.remote_dir)
    (Path(finished.record.local_dir) / "job.log").unlink()  # else `logs` serves the pulled log
    with pytest.raises(NotFound) as caught:
        _bounded(lambda: jobs.logs(finished.record.run_id, out=io.BytesIO(), follow=True,
                                   resolve=lambda name: local_target, liveness_interval=FAST))
    assert f"run {finished.record.run_id} succeeded, but job.log is missing" in caught.value.message
    assert f"its run directory {finished.record.remote_dir} is gone" in caught.value.message
    assert jobs.load_record(finished.record.run_id).status == "succeeded"


@pytest.mark.parametrize("tampering", [
    "os.remove(manifest); os.symlink('/etc/passwd', manifest)",
    "open(manifest, 'w').write('[]')",
    "open(manifest, 'wb').write(b'\\xff\\xfe not json')",
])
def test_the_outcome_reaches_the_local_manifest_when_the_job_spoils_the_remote_one(local_target, project, tampering):
    (project / "spoil.py").write_text(
        "import os, sys\nmanifest = os.path.join(os.environ['GPUFLOW_RUN_DIR'], 'manifest.json')\n"
        f"{tampering}\nsys.exit(3)\n"
    )
    with pytest.raises(JobFailed) as caught:
        jobs.run(local_target, project_dir=project, module=None, args=["python", "spoil.py"], out=io.BytesIO())
    assert caught.value.exit_code == 3
    [record] = jobs.all_records()
    manifest = _manifest(record)
    assert manifest["run_id"] == record.run_id and manifest["exit_code"] == 3
    assert manifest["job_started_at"] == record.job_started_at and manifest["python"] == platform.python_version()
