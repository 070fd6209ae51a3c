"""Spot interruptions on the instance side: the supervisor's IMDSv2 watcher, the
`interrupted` status, save-and-stop, and `run --resume` — against a mock IMDSv2
process on 127.0.0.1 and a stand-in job that honours the training side's contract
(SIGTERM -> checkpoint/state.json -> exit 75; started again -> continues)."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from gpuflow import jobs
from gpuflow.errors import JobInterrupted, UsageError
from tests.jobs.spot_helpers import (  # noqa: F401 - fixtures
    imds,
    spot_cluster,
    spot_job_args,
    spot_project,
    spot_target,
    trained_steps,
    wait_until,
)

STEPS, EPOCHS = 20, 2
EVERY_STEP = [(epoch, step) for epoch in range(EPOCHS) for step in range(STEPS)]


def _resolve(target):
    return lambda name: target


def _start(target, project, *extra, steps=STEPS, delay=0.05) -> jobs.RunRecord:
    outcome = jobs.run(target, project_dir=project, module=None, args=spot_job_args(steps, EPOCHS, delay, *extra),
                       out=io.BytesIO(), detach=True)
    return outcome.record


def _exit_code(record) -> int:
    path = Path(record.remote_dir) / "exit_code"
    wait_until(path.exists, what="the job's end")
    return int(path.read_text())


def test_a_spot_notice_stops_the_job_which_saves_and_resume_continues_it(spot_target, spot_project, imds):
    """Notice -> interruption.json -> SIGTERM -> checkpoint, exit 75 -> `interrupted` -> resume -> done,
    every step trained exactly once; the IMDS token expires on the way (401 -> a new token)."""
    notice = imds.notice(after=3)
    (imds.control / "token-uses").write_text("2")
    said: list[str] = []
    with pytest.raises(JobInterrupted) as raised:
        jobs.run(spot_target, project_dir=spot_project, module=None, args=spot_job_args(STEPS, EPOCHS, 0.05),
                 out=io.BytesIO(), say=said.append, liveness_interval=0.2)
    [record] = jobs.all_records()
    run_dir = Path(record.remote_dir)
    state = json.loads((run_dir / "outputs" / "checkpoint" / "state.json").read_text())
    assert raised.value.exit_code == 75
    assert f"interrupted (resumable at epoch {state['epoch']} step {state['step']})" in raised.value.message
    assert "after a spot interruption notice (terminate at 2026-11-30T15:00:00Z)" in raised.value.message
    assert f"gpuflow run --resume {record.run_id}" in raised.value.one_line()
    assert record.status is jobs.RunState.INTERRUPTED and record.exit_code == 75
    assert record.checkpoint == jobs.Checkpoint(state["epoch"], state["step"])
    assert str(record.run_status) == f"interrupted (resumable at epoch {state['epoch']} step {state['step']})"
    interruption = json.loads((run_dir / "interruption.json").read_text())
    assert interruption["notice"] == notice and interruption["seen_at"].endswith("Z")
    assert json.loads((run_dir / "watcher.json").read_text())["state"] == "watching"
    log = (run_dir / "job.log").read_text()
    assert f"interrupted: checkpoint saved at epoch {state['epoch']} step {state['step']} (resumable)" in log
    done = trained_steps(run_dir / "outputs")
    assert done == EVERY_STEP[: len(done)] and len(done) < len(EVERY_STEP)
    assert done[-1] == (state["epoch"], state["step"])
    # IMDSv2: tokens were renewed after a 401, and no GET went without one that worked.
    requests = imds.requests()
    assert "GET /latest/meta-data/spot/instance-action 401" in requests
    renewed = requests.index("GET /latest/meta-data/spot/instance-action 401")
    assert requests[renewed + 1] == "PUT /latest/api/token 200"
    assert requests[-1] == "GET /latest/meta-data/spot/instance-action 200"
    # The pulled copy holds the checkpoint too.
    assert json.loads((Path(record.local_dir) / "outputs" / "checkpoint" / "state.json").read_text()) == state

    imds.clear_notice()
    printed = io.BytesIO()
    outcome = jobs.resume(record.run_id, out=printed, resolve=_resolve(spot_target), liveness_interval=0.2)
    assert outcome.exit_code == 0
    assert trained_steps(run_dir / "outputs") == EVERY_STEP
    # The resumed attempt's output is appended to the same log; `run --resume` streamed only the new part.
    full_log = (run_dir / "job.log").read_text()
    assert full_log.startswith(log) and full_log.endswith("finished\n")
    assert printed.getvalue().decode() == full_log[len(log):]
    assert printed.getvalue().decode().startswith(f"resumed after epoch {state['epoch']} step {state['step']}")
    record = jobs.load_record(record.run_id)
    assert record.status is jobs.RunState.SUCCEEDED and record.checkpoint is None and record.interruption is None
    [resumed] = record.resumes
    assert resumed.attempt == 1 and resumed.previous_exit_code == 75
    assert resumed.checkpoint == jobs.Checkpoint(state["epoch"], state["step"])
    assert resumed.previous_status.startswith("interrupted (resumable at")
    # The last attempt's files were moved aside on the instance; the manifest lists the resume.
    assert (run_dir / "attempts" / "1" / "exit_code").read_text().strip() == "75"
    assert (run_dir / "attempts" / "1" / "interruption.json").exists() and not (run_dir / "interruption.json").exists()
    manifest = json.loads((Path(record.local_dir) / "manifest.json").read_text())
    assert manifest["exit_code"] == 0 and [entry["attempt"] for entry in manifest["resumes"]] == [1]
    assert manifest["resumes"][0]["checkpoint"] == {"epoch": state["epoch"], "step": state["step"]}
    assert manifest["duration_seconds"] >= resumed.previous_duration_seconds > 0


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def closed_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


@pytest.mark.parametrize("endpoint", ["refused", "silent", "not-http"])
def test_an_unreachable_imds_turns_the_watcher_off_and_the_job_runs_on(
    endpoint, spot_target, spot_project, monkeypatch, request
):
    url = {
        "refused": lambda: f"http://127.0.0.1:{request.getfixturevalue('closed_port')}",
        "silent": lambda: f"http://127.0.0.1:{request.getfixturevalue('silent_port')}",
        "not-http": lambda: "file:///etc/passwd",
    }[endpoint]()
    monkeypatch.setenv("GPUFLOW_IMDS_ENDPOINT", url)
    monkeypatch.setenv("GPUFLOW_IMDS_POLL_SECONDS", "0.2")
    outcome = jobs.run(spot_target, project_dir=spot_project, module=None, args=spot_job_args(5, 1, 0.01),
                       out=io.BytesIO())
    assert outcome.exit_code == 0
    run_dir = Path(outcome.record.remote_dir)
    watcher = json.loads((run_dir / "watcher.json").read_text()) if (run_dir / "watcher.json").exists() else None
    # Off, or (the job ended first) never on; never an interruption, and nothing in the job's log.
    assert watcher is None or watcher["state"] == "off"
    assert not (run_dir / "interruption.json").exists()
    assert trained_steps(run_dir / "outputs") == [(0, step) for step in range(5)]
    assert (run_dir / "job.log").read_text() == "started\n" + "".join(f"epoch 0 step {s}\n" for s in range(5)) + "finished\n"


def test_an_imds_that_gives_no_token_turns_the_watcher_off(spot_target, spot_project, monkeypatch, tmp_path):
    """Something answers HTTP there, but no IMDSv2 token (403): off, with the reason, and the job unaffected."""
    import http.server

    class NoToken(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoToken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GPUFLOW_IMDS_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        gate = tmp_path / "may-finish"
        record = _start(spot_target, spot_project, f"gate={gate}", steps=3, delay=0.01)
        watcher = Path(record.remote_dir) / "watcher.json"
        wait_until(watcher.exists, what="the watcher's verdict")
        assert json.loads(watcher.read_text())["state"] == "off"
        assert "HTTP 403" in json.loads(watcher.read_text())["reason"]
        gate.touch()
        assert _exit_code(record) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_a_rebalance_recommendation_is_recorded_and_shown_not_acted_on(spot_target, spot_project, imds, tmp_path):
    notice = imds.rebalance()
    gate = tmp_path / "may-finish"
    record = _start(spot_target, spot_project, f"gate={gate}", steps=5, delay=0.01)
    rebalance = Path(record.remote_dir) / "rebalance.json"
    wait_until(rebalance.exists, what="the rebalance record")
    assert json.loads(rebalance.read_text())["notice"] == notice
    listed = {row.record.run_id: str(row.status) for row in jobs.list_runs(resolve=_resolve(spot_target))}
    assert listed[record.run_id] == "running (rebalance recommended at 2026-11-30T14:55:00Z)"
    said: list[str] = []
    followed: list[object] = []
    follower = threading.Thread(target=lambda: followed.append(jobs.logs(
        record.run_id, out=io.BytesIO(), follow=True, resolve=_resolve(spot_target), say=said.append,
        liveness_interval=0.1)))
    follower.start()
    shown = f"run {record.run_id}: rebalance recommended at 2026-11-30T14:55:00Z"
    try:
        wait_until(lambda: shown in said, what="the rebalance line while following")
    finally:
        gate.touch()
        follower.join()
    assert followed == [0] and said.count(shown) == 1
    assert trained_steps(Path(record.remote_dir) / "outputs") == [(e, s) for e in range(EPOCHS) for s in range(5)]
    assert not (Path(record.remote_dir) / "interruption.json").exists()
    assert jobs.load_record(record.run_id).status is jobs.RunState.SUCCEEDED


def test_the_watcher_ends_with_the_job_and_never_feeds_the_heartbeat(spot_target, spot_project, imds):
    outcome = jobs.run(spot_target, project_dir=spot_project, module=None, args=spot_job_args(5, 1, 0.05),
                       out=io.BytesIO())
    run_dir = Path(outcome.record.remote_dir)
    assert json.loads((run_dir / "watcher.json").read_text())["state"] == "watching"

    def watchers() -> list[int]:
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    command = Path(f"/proc/{name}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"watch_main" in command and str(run_dir).encode() in command:
                    found.append(int(name))
        return found

    wait_until(lambda: not watchers(), what="the watcher's end")  # it was killed before exit_code was written
    heartbeat = Path(spot_target.connect().base_dir) / "heartbeat"
    assert heartbeat.stat().st_mtime <= (run_dir / "exit_code").stat().st_mtime + 1


def test_stop_kills_a_job_that_ignores_sigterm_after_the_grace(spot_target, spot_project):
    record = _start(spot_target, spot_project, "ignore-term", steps=200, delay=0.05)
    log = Path(record.remote_dir) / "job.log"
    wait_until(lambda: "epoch 0 step 1" in log.read_text(), what="training")
    stopped, outcome = jobs.stop(record.run_id, grace_seconds=0.5, resolve=_resolve(spot_target))
    assert outcome is jobs.StopOutcome.KILLED
    assert stopped.status_text() == "failed(137)"
    with pytest.raises(UsageError, match="left no complete checkpoint"):
        jobs.resume(record.run_id, out=io.BytesIO(), resolve=_resolve(spot_target))


def test_resume_refuses_a_running_or_succeeded_run(spot_target, spot_project, tmp_path):
    running = _start(spot_target, spot_project, f"gate={tmp_path / 'never'}", steps=2, delay=0.01)
    with pytest.raises(UsageError, match=f"run {running.run_id} is still running: nothing to resume"):
        jobs.resume(running.run_id, out=io.BytesIO(), resolve=_resolve(spot_target))
    jobs.stop(running.run_id, resolve=_resolve(spot_target))
    finished = jobs.run(spot_target, project_dir=spot_project, module=None, args=spot_job_args(2, 1, 0.0),
                        out=io.BytesIO())
    with pytest.raises(UsageError, match=f"run {finished.record.run_id} succeeded: nothing to resume"):
        jobs.resume(finished.record.run_id, out=io.BytesIO(), resolve=_resolve(spot_target))
    assert not (Path(finished.record.remote_dir) / "attempts").exists()


def test_two_resumes_at_once_start_the_job_once(spot_target, spot_project, tmp_path):
    gate = tmp_path / "may-finish"
    record = _start(spot_target, spot_project, f"gate={gate}", steps=STEPS, delay=0.05)
    wait_until(lambda: "epoch 0 step 1" in (Path(record.remote_dir) / "job.log").read_text(), what="training")
    assert jobs.stop(record.run_id, resolve=_resolve(spot_target))[0].status is jobs.RunState.INTERRUPTED
    gate.touch()
    results: list[object] = []

    def resume() -> None:
        try:
            results.append(jobs.resume(record.run_id, out=io.BytesIO(), resolve=_resolve(spot_target), detach=True))
        except UsageError as exc:
            results.append(exc)

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [result for result in results if isinstance(result, UsageError)]
    assert len(refused) == 1 and ("was not resumed" in refused[0].message or "still running" in refused[0].message)
    assert _exit_code(record) == 0
    assert trained_steps(Path(record.remote_dir) / "outputs") == EVERY_STEP
    assert sorted(os.listdir(Path(record.remote_dir) / "attempts")) == ["1"]


@pytest.mark.parametrize(("text", "seconds"), [
    (None, 5.0), ("", 5.0), ("0.2", 0.2), ("0", 0.05), ("-3", 0.05), ("nan", 5.0), ("inf", 300.0), ("1e9", 300.0),
    ("soon", 5.0),
])
def test_the_poll_interval_is_always_a_sleep(text, seconds):
    from gpuflow.jobs.imds_watch import poll_interval

    assert poll_interval(text) == seconds


@pytest.mark.ssh
def test_stop_saves_and_stops_then_resume_continues_over_ssh(sshd_session, spot_project, tmp_path):
    """Save and stop, then resume, through the real loopback OpenSSH (one quoting path for the scripts;
    a base directory with quotes, `$(...)` and spaces)."""
    from gpuflow.records import SSHTarget
    from gpuflow.transport.ssh import Backoff, SSHRunner

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd_session.known_hosts_line() + "\n")
    ssh = SSHTarget(host="127.0.0.1", port=sshd_session.port, user=sshd_session.user,
                    key_path=str(sshd_session.client_key), known_hosts_path=str(known_hosts))
    base = tmp_path / "ssh instance with 'quotes' and $(spaces)"

    def connect() -> SSHRunner:
        return SSHRunner(ssh, base_dir=str(base), backoff=Backoff(retries=8, initial=0.1, maximum=1.0))

    def push(project_dir: Path) -> None:
        runner = connect()
        try:
            runner.put_bytes((project_dir / "spotjob.py").read_bytes(), f"{runner.base_dir}/project/spotjob.py")
        finally:
            runner.close()

    target = jobs.RunTarget(cluster=spot_cluster(), connect=connect, sync_project=push)
    gate = tmp_path / "may-finish"
    record = _start(target, spot_project, f"gate={gate}", steps=STEPS, delay=0.05)
    log = Path(record.remote_dir) / "job.log"
    wait_until(lambda: log.exists() and "epoch 0 step 1" in log.read_text(), what="training")
    stopped, outcome = jobs.stop(record.run_id, resolve=_resolve(target))  # the default grace: save and stop
    assert outcome is jobs.StopOutcome.TERMINATED
    state = json.loads((Path(record.remote_dir) / "outputs" / "checkpoint" / "state.json").read_text())
    assert stopped.status is jobs.RunState.INTERRUPTED and stopped.exit_code == 75
    assert stopped.status_text() == f"interrupted (resumable at epoch {state['epoch']} step {state['step']})"
    assert stopped.interruption is None  # no spot notice: `gpuflow stop`
    gate.touch()
    printed = io.BytesIO()
    finished = jobs.resume(record.run_id, out=printed, resolve=_resolve(target))
    assert finished.exit_code == 0 and printed.getvalue().decode().endswith("finished\n")
    assert trained_steps(Path(record.remote_dir) / "outputs") == EVERY_STEP
    assert trained_steps(Path(finished.record.local_dir) / "outputs") == EVERY_STEP
