"""The CLI against sandbox clusters: run/logs/pull/runs/stop, `run --up --down`, `gpuflow demo`.

The sandbox's EC2 API is moto in this process (``in_process_sandbox``), so a
test can look at what is left in the fake cloud after gpuflow is done; the
"instance" is a LocalRunner directory under the test's GPUFLOW_HOME.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from gpuflow import clusters, jobs
from gpuflow.errors import ClusterNotFound
from infra.sandbox import in_process_sandbox

pytestmark = pytest.mark.slow


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def _gpuflow_leftovers() -> dict[str, list]:
    """What gpuflow could have left in the (fake) cloud."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1")
    instances = [
        instance
        for reservation in ec2.describe_instances()["Reservations"]
        for instance in reservation["Instances"]
        if instance["State"]["Name"] != "terminated"
    ]
    groups = [group for group in ec2.describe_security_groups()["SecurityGroups"] if group["GroupName"] != "default"]
    return {"instances": instances, "security_groups": groups, "key_pairs": ec2.describe_key_pairs()["KeyPairs"]}


def test_run_up_down_leaves_nothing_behind_when_the_job_fails(project, monkeypatch, capfd, gpuflow_home):
    monkeypatch.chdir(project)
    with in_process_sandbox():
        code = cli(["run", "--up", "--sandbox", "--down", "ci-box", "--", "python", "job.py", "3", "0", "5"])
        captured = capfd.readouterr()
        assert code == 5, captured.err
        assert _gpuflow_leftovers() == {"instances": [], "security_groups": [], "key_pairs": []}
        [record] = jobs.all_records()
        # Something was really launched and then terminated.
        import boto3

        reservations = boto3.client("ec2", region_name="us-east-1").describe_instances()["Reservations"]
        assert [instance["State"]["Name"] for r in reservations for instance in r["Instances"]] == ["terminated"]
    assert "line 0002" in captured.out
    assert re.search(r"gpuflow: error: run \S+ failed with exit code 5", captured.err)
    with pytest.raises(ClusterNotFound):
        clusters.get_cluster("ci-box")
    assert not (gpuflow_home / "sandbox" / "ci-box").exists()
    assert not list((gpuflow_home / "keys").glob("ci-box*")) if (gpuflow_home / "keys").exists() else True
    local = Path(record.local_dir)
    assert local == project / "runs" / record.run_id
    assert json.loads((local / "outputs" / "metrics.json").read_text()) == {"lines": 3}


def test_cli_run_detach_runs_logs_pull_stop_on_a_sandbox_cluster(project, monkeypatch, capfd):
    monkeypatch.chdir(project)
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("box", {"sandbox": True}, project_dir=project))
        try:
            assert cli(["run", "box", "--", "python", "job.py", "4", "0", "0", "$(echo hi)"]) == 0
            foreground = capfd.readouterr()
            [finished] = jobs.all_records()
            assert foreground.out.encode() == (Path(finished.local_dir) / "job.log").read_bytes()
            assert json.loads((Path(finished.local_dir) / "outputs" / "argv.json").read_text()) == ["$(echo hi)"]

            assert cli(["run", "box", "--detach", "--", "python", "job.py", "100000", "0.05", "0"]) == 0
            started = capfd.readouterr()
            run_id = re.search(r"run (\d{8}-\d{6}-[0-9a-f]{4}) keeps running", started.err).group(1)

            assert cli(["runs", "--json"]) == 0
            listed = {item["run_id"]: item["status"] for item in json.loads(capfd.readouterr().out)}
            assert listed == {finished.run_id: "succeeded", run_id: "running"}

            assert cli(["pull", run_id]) == 0
            assert "job still running" in capfd.readouterr().out
            assert (project / "runs" / run_id / "outputs" / "checkpoints" / "latest.bin").stat().st_size == 200_000

            assert cli(["logs", run_id]) == 0
            assert capfd.readouterr().out.startswith("line 0000 ")

            assert cli(["stop", run_id, "--grace", "3"]) == 0
            assert "failed(143)" in capfd.readouterr().out
            assert cli(["logs", run_id, "-f"]) == 143
            capfd.readouterr()
            assert cli(["runs"]) == 0
            table = capfd.readouterr().out
            assert re.search(rf"{run_id}\s+box\s+failed\(143\)", table)
            assert cli(["logs", "no-such-run"]) == 4
        finally:
            clusters.down("box")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("sklearn") is None,
    reason="`gpuflow demo` trains a Keras model on sklearn's digits: needs TensorFlow and scikit-learn "
    "(pip install -e '.[train]')",
)
def test_gpuflow_demo_trains_pulls_and_cleans_up(capfd, gpuflow_home):
    with in_process_sandbox():  # the demo's own (nested) sandbox shares this fake cloud: inspect it afterwards
        code = cli(["demo", "--epochs", "8", "--quiet"])
        captured = capfd.readouterr()
        assert code == 0, captured.err
        assert _gpuflow_leftovers() == {"instances": [], "security_groups": [], "key_pairs": []}
    accuracy = float(re.search(r"test accuracy ([\d.]+)% on digits", captured.out).group(1))
    assert accuracy >= 85.0
    assert re.search(r", \d+ s from up to down", captured.out)  # the summary line (its time is measured for README, not asserted)
    checkpoint = Path(re.search(r"checkpoint: (\S+)", captured.out).group(1))
    curves = Path(re.search(r"curves: +(\S+)", captured.out).group(1))
    assert checkpoint.name == "best_model.keras" and checkpoint.stat().st_size > 10_000
    assert curves.read_bytes().startswith(b"\x89PNG")
    # --visualize's pictures were pulled from outputs/visualization/ and two are named.
    cam = Path(re.search(r"grad-cam: +(\S+)", captured.out).group(1))
    confusion = Path(re.search(r"confusion: +(\S+)", captured.out).group(1))
    assert cam == checkpoint.parent / "visualization" / "cam.png"
    assert confusion == checkpoint.parent / "visualization" / "confusion_matrix.png"
    for picture in (cam, confusion):
        assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 5_000
    pictures = json.loads((checkpoint.parent / "visualization" / "visualization.json").read_text())
    assert pictures["dataset"] == "digits" and pictures["cam"]["method"] == "Grad-CAM"
    manifest = json.loads((checkpoint.parent.parent / "manifest.json").read_text())
    assert manifest["sandbox"] is True and manifest["tensorflow"] and manifest["exit_code"] == 0
    assert manifest["command"][-2:] == ["--output", manifest["command"][-1]]
    assert not [name for name in (gpuflow_home / "sandbox").iterdir() if name.name.startswith("gpuflow-demo")]
    assert all(str(status.status) == "succeeded" for status in jobs.list_runs())


@pytest.mark.ssh
def test_sandbox_cluster_through_real_ssh_sync_run_pull(project, monkeypatch, capfd, sshd, gpuflow_home):
    """GPUFLOW_SANDBOX_SSH: the sandbox instance is reached through the loopback
    OpenSSH server, so sync, run, the log stream and pull all cross real SSH."""
    (project / "data dir").mkdir()
    (project / "data dir" / "naïve 'quoted' file.txt").write_text("payload")
    monkeypatch.setenv(
        "GPUFLOW_SANDBOX_SSH",
        f"host=127.0.0.1,port={sshd.port},user={sshd.user},key={sshd.client_key},"
        f"host_key={sshd.directory / 'ssh_host_ed25519_key.pub'}",
    )
    monkeypatch.chdir(project)
    with in_process_sandbox():
        cluster = clusters.up(clusters.resolve_spec("sshbox", {"sandbox": True}, project_dir=project))
        try:
            from gpuflow import nodes

            runner = nodes.runner_for(cluster)
            assert type(runner).__name__ == "SSHRunner"
            runner.close()
            code = cli(["run", "sshbox", "--", "python", "job.py", "30", "0.02", "3", "a b", "$HOME"])
            captured = capfd.readouterr()
            assert code == 3, captured.err
            synced = Path(nodes.sandbox_directory(cluster)) / "project" / "data dir" / "naïve 'quoted' file.txt"
            assert synced.read_text() == "payload"
        finally:
            clusters.down("sshbox")
    [record] = jobs.all_records()
    local = Path(record.local_dir)
    assert captured.out.encode() == (local / "job.log").read_bytes()
    assert captured.out.count("line ") == 30
    assert json.loads((local / "outputs" / "argv.json").read_text()) == ["a b", "$HOME"]
    assert json.loads((local / "outputs" / "metrics.json").read_text()) == {"lines": 30}


class _BreaksOnFirstWrite(io.BytesIO):
    """Output that fails as soon as the job's log starts (gpuflow crashing mid-run),
    remembering the pid of the job that was running and its command line then."""

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = home
        self.job_pid: int | None = None
        self.job_cmdline = b""

    def write(self, data):
        [pid_file] = self.home.glob("sandbox/*/*/runs/*/job.pid")
        self.job_pid = int(pid_file.read_text())
        try:
            self.job_cmdline = Path(f"/proc/{self.job_pid}/cmdline").read_bytes()
        except OSError:
            pass  # already gone: the assertion on job_cmdline says so
        raise RuntimeError("gpuflow broke while streaming")


def test_run_down_stops_a_still_running_job_before_teardown(project, gpuflow_home):
    out = _BreaksOnFirstWrite(gpuflow_home)
    spec = clusters.resolve_spec("crashy", {"sandbox": True}, project_dir=project)
    with pytest.raises(RuntimeError, match="broke while streaming"):
        jobs.run_on_cluster(
            "crashy", project_dir=project, module=None, args=["python", "job.py", "100000", "0.05", "0"],
            out=out, up_spec=spec, down=True,
        )
    # When gpuflow broke, the job was alive (so its end below is the teardown's doing).
    assert b"job.py\x00100000" in out.job_cmdline
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(out.job_pid):
        time.sleep(0.05)
    assert not _alive(out.job_pid)
    with pytest.raises(ClusterNotFound):
        clusters.get_cluster("crashy")
    assert not (gpuflow_home / "sandbox" / "crashy").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_run_whose_supervisor_died_is_lost_and_stops_feeding_the_heartbeat(local_target, project):
    outcome = jobs.run(local_target, project_dir=project, module=None, args=["python", "job.py", "100000", "0.05", "0"],
                       out=io.BytesIO(), detach=True, heartbeat_seconds=0.2)
    run_dir = Path(outcome.record.remote_dir)
    heartbeat = run_dir.parent.parent / "heartbeat"
    job_pid = int((run_dir / "job.pid").read_text())
    supervisor_pid = int((run_dir / "supervisor.pid").read_text())
    os.kill(supervisor_pid, signal.SIGKILL)  # a crash (OOM killer, ...) of the supervisor
    os.killpg(job_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_alive(job_pid) or _alive(supervisor_pid)):
        time.sleep(0.05)
    # No orphan keeps the instance "busy": the heartbeat stops moving (within one interval, on an idle machine).
    deadline = time.monotonic() + 15
    while True:
        before = heartbeat.stat().st_mtime_ns
        time.sleep(0.8)
        if heartbeat.stat().st_mtime_ns == before:
            break
        assert time.monotonic() < deadline, "the heartbeat is still being touched after its supervisor died"
    assert not (run_dir / "exit_code").exists()
    assert [str(status.status) for status in jobs.list_runs(resolve=lambda name: local_target)] == ["lost"]


def test_ctrl_c_without_a_terminal_detaches_and_says_how_to_reattach(project, monkeypatch, capfd):
    monkeypatch.chdir(project)
    real_follow = jobs.follow_log
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_follow(*args, **kwargs)

    monkeypatch.setattr(jobs.foreground, "follow_log", interrupted_once)
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("ctrlc", {"sandbox": True}, project_dir=project))
        try:
            code = cli(["run", "ctrlc", "--", "python", "job.py", "100000", "0.05", "0"])
            captured = capfd.readouterr()
            [record] = jobs.all_records()
            assert code == 130
            assert f"detached: run {record.run_id} keeps running on ctrlc" in captured.err
            assert f"gpuflow logs {record.run_id} -f" in captured.err
            assert [str(status.status) for status in jobs.list_runs()] == ["running"]
            assert cli(["stop", record.run_id, "--grace", "2"]) == 0
        finally:
            clusters.down("ctrlc")


def test_plain_down_of_a_sandbox_cluster_ends_its_jobs_and_its_disk(project, monkeypatch, capfd, gpuflow_home):
    """`gpuflow down` terminates a sandbox instance as EC2 would a real one:
    a detached job still running "on" it dies and its directory goes."""
    monkeypatch.chdir(project)
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("doomed", {"sandbox": True}, project_dir=project))
        assert cli(["run", "doomed", "--detach", "--", "python", "job.py", "100000", "0.05", "0"]) == 0
        capfd.readouterr()
        [record] = jobs.all_records()
        pid_file = Path(record.remote_dir) / "job.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not pid_file.exists():
            time.sleep(0.05)
        job_pid = int(pid_file.read_text())
        assert _alive(job_pid)

        assert cli(["down", "doomed", "--yes"]) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(job_pid):
            time.sleep(0.05)
        assert not _alive(job_pid)
        assert not (gpuflow_home / "sandbox" / "doomed").exists()
        assert _gpuflow_leftovers() == {"instances": [], "security_groups": [], "key_pairs": []}


def test_run_with_data_syncs_it_once_and_names_it_to_the_job(project, monkeypatch, capfd, tmp_path):
    data = tmp_path / "my-data"
    data.mkdir()
    (data / "labels.txt").write_text("cat\ndog\n")
    (project / "read_data.py").write_text(
        "import os, pathlib\n"
        "root = pathlib.Path(os.environ['GPUFLOW_DATA_DIR'])\n"
        "print('data at', root.name, 'root', pathlib.Path(os.environ['GPUFLOW_DATA_ROOT']).name)\n"
        "print((root / 'labels.txt').read_text(), end='')\n"
    )
    monkeypatch.chdir(project)
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("databox", {"sandbox": True}, project_dir=project))
        try:
            assert cli(["run", "databox", "--data", str(data), "--", "python", "read_data.py"]) == 0
            first = capfd.readouterr()
            assert "data at my-data root data\ncat\ndog\n" in first.out
            assert "sent 1 of 1 files" in first.err
            assert cli(["run", "databox", "--data", str(data), "--", "python", "read_data.py"]) == 0
            assert "sent 0 of 1 files" in capfd.readouterr().err  # later runs reuse the synced data
            assert cli(["run", "databox", "--data", str(tmp_path / "missing"), "--", "true"]) == 2
            error = capfd.readouterr().err.strip().splitlines()
            assert error == [f"gpuflow: error: --data {tmp_path / 'missing'}: no such directory"]
            (tmp_path / "bad name").mkdir()
            assert cli(["run", "databox", "--data", str(tmp_path / "bad name"), "--", "true"]) == 2
            assert "invalid data directory name 'bad name'" in capfd.readouterr().err
        finally:
            clusters.down("databox")


def test_a_training_module_gets_the_synced_data_dir_unless_given():
    argv = jobs.build_job_argv(python="py", module="training.cifar10_cnn", args=["--epochs", "1"],
                               output_dir="/r/outputs", data_dir="/b/data/cifar")
    assert argv == ["py", "-m", "training.cifar10_cnn", "--epochs", "1", "--output", "/r/outputs",
                    "--data-dir", "/b/data/cifar"]
    mine = jobs.build_job_argv(python="py", module="training.cifar10_cnn", args=["--data-dir=/elsewhere"],
                               output_dir="/r/outputs", data_dir="/b/data/cifar")
    assert mine == ["py", "-m", "training.cifar10_cnn", "--data-dir=/elsewhere", "--output", "/r/outputs"]
    assert jobs.build_job_argv(python="py", module="mine.train", args=[], output_dir="/o", data_dir="/d") == [
        "py", "-m", "mine.train"]


def _processes_of_runs_under(root: Path) -> list[int]:
    """Pids whose environment names a run directory under ``root`` (GPUFLOW_RUN_DIR, which
    every job and its children carry): what would still run "on" the sandbox's instances."""
    wanted = f"GPUFLOW_RUN_DIR={os.path.realpath(root)}/".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environment = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(entry.startswith(wanted) for entry in environment):
            found.append(int(name))
    return found


def _wait_until_none_left(root: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_of_runs_under(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_run_up_down_leaves_no_process_of_the_job_behind(project, monkeypatch, capfd, gpuflow_home):
    """The job ends but leaves children: one in its process group, one in a session of its own.
    `run --up --sandbox --down` terminates the instance, and with it both."""
    monkeypatch.chdir(project)
    spawn = "setsid sleep 300 </dev/null >/dev/null 2>&1 & sleep 300 </dev/null >/dev/null 2>&1 & echo spawned"
    with in_process_sandbox():
        code = cli(["run", "--up", "--sandbox", "--down", "spawner", "--", "sh", "-c", spawn])
        captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "spawned" in captured.out
    assert _wait_until_none_left(gpuflow_home / "sandbox") == []
    assert not (gpuflow_home / "sandbox" / "spawner").exists()


def test_sandbox_reap_terminates_like_ec2_its_jobs_and_directory_go(project, monkeypatch, capfd, gpuflow_home):
    """A sandbox cluster gpuflow no longer knows (its record is gone) is reaped:
    its running job and supervisor die and its directory is deleted, as EC2's
    termination would do to a real instance."""
    monkeypatch.chdir(project)
    with in_process_sandbox():
        clusters.up(clusters.resolve_spec("orphan", {"sandbox": True}, project_dir=project))
        assert cli(["run", "orphan", "--detach", "--", "python", "job.py", "100000", "0.05", "0"]) == 0
        capfd.readouterr()
        [record] = jobs.all_records()
        run_dir = Path(record.remote_dir)
        supervisor_pid = int((run_dir / "supervisor.pid").read_text())
        job_pid = int((run_dir / "job.pid").read_text())
        assert _alive(job_pid) and _alive(supervisor_pid)
        (gpuflow_home / "state" / "clusters" / "orphan.json").unlink()

        assert cli(["reap", "--sandbox", "--yes"]) == 0
        capfd.readouterr()
        assert _wait_until_none_left(gpuflow_home / "sandbox") == []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_alive(job_pid) or _alive(supervisor_pid)):
            time.sleep(0.05)
        assert not _alive(job_pid) and not _alive(supervisor_pid)
        assert not (gpuflow_home / "sandbox" / "orphan").exists()
        assert _gpuflow_leftovers() == {"instances": [], "security_groups": [], "key_pairs": []}
        assert [str(status.status) for status in jobs.list_runs()] == ["lost"]  # and it really is


def test_sigterm_to_run_up_down_still_stops_the_job_and_tears_down(project, gpuflow_home):
    """SIGTERM (a cancelled CI job) is an exit path too: gpuflow ends as on Ctrl-C —
    the job is stopped, its outputs pulled, the sandbox cluster torn down — and
    nothing of the job is left running."""
    import subprocess
    import sys

    repository = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHONPATH": str(repository)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gpuflow", "run", "--up", "--sandbox", "--down", "termed", "--",
         "python", "job.py", "100000", "0.05", "0"],
        cwd=project, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout.readline().startswith(b"line 0000 ")  # the log streams: the job runs
        [pid_file] = gpuflow_home.glob("sandbox/termed/*/runs/*/job.pid")
        job_pid = int(pid_file.read_text())
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, err.decode()
    assert b"was stopped with exit code 143" in err
    assert _wait_until_none_left(gpuflow_home / "sandbox") == []
    assert not _alive(job_pid)
    assert not (gpuflow_home / "sandbox" / "termed").exists()
    assert [record.status for record in jobs.all_records()] == ["failed"]
