"""A run starts in one round trip: its files, the launch and the wait for the job's pid in one remote
script (payload on stdin), woken by the event rather than a polling loop."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from gpuflow.jobs import scripts, start
from gpuflow.jobs.records import MANIFEST_NAME, SUPERVISOR_NAME
from gpuflow.transport.local import LocalRunner
from tests.jobs.conftest import fake_cluster, job_args
from gpuflow.jobs import RunTarget


class CountingRunner(LocalRunner):
    """A local target that logs every remote operation (each one a round trip, or several, over SSH)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.log: list[str] = []

    def run(self, argv, **options):
        self.log.append("run")
        return super().run(argv, **options)

    def run_script(self, script, **options):
        self.log.append("run_script")
        return super().run_script(script, **options)

    def put_bytes(self, data, remote_path, mode=0o644):
        self.log.append("put_bytes")
        return super().put_bytes(data, remote_path, mode)

    def read_from(self, remote_path, offset=0, limit=1 << 20):
        self.log.append("read_from")
        return super().read_from(remote_path, offset, limit)

    def get_file(self, remote_path, local_path):
        self.log.append("get_file")
        return super().get_file(remote_path, local_path)


def test_after_the_environment_a_start_is_one_remote_command_and_writes_the_same_files(tmp_path, project, monkeypatch):
    runner = CountingRunner(tmp_path / "instance")
    prepared = []
    real_prepare = start.prepare_node

    def prepare(*arguments, **options):
        result = real_prepare(*arguments, **options)
        prepared.append(len(runner.log))
        return result

    monkeypatch.setattr(start, "prepare_node", prepare)
    target = RunTarget(cluster=fake_cluster(), connect=lambda: runner, sync_project=None)
    record = start.start_run(target, runner, project_dir=project, module=None, args=["job.py", *job_args(1)[1:]])
    assert runner.log[prepared[0]:] == ["run_script"]  # was: 2 uploads, the launch, then reads of job.pid

    run_dir = Path(record.remote_dir)
    supervisor = run_dir / SUPERVISOR_NAME
    assert stat.S_IMODE(supervisor.stat().st_mode) == 0o755
    assert supervisor.read_text().startswith("#!/usr/bin/env bash\n# gpuflow job supervisor for run " + record.run_id)
    manifest = run_dir / MANIFEST_NAME
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o644
    assert json.loads(manifest.read_text())["run_id"] == record.run_id
    assert (run_dir / "job.pid").exists() or (run_dir / "exit_code").exists()
    assert not (run_dir / scripts.WAKE_NAME).exists()  # the start removes its FIFO
    assert not [name for name in os.listdir(run_dir) if name.startswith(".") and name.endswith(".tmp")]


def test_the_payload_keeps_names_to_one_path_component():
    for name in ("../evil", "a/b", "", "..", "a b", "x\ny"):
        with pytest.raises(ValueError):
            scripts.start_files_payload([(name, b"", 0o644)])


def _start(tmp_path: Path, run_dir: Path, files, supervisor_name: str, path: str, timeout: float = 30):
    script = scripts.start_script(run_dir=str(run_dir), python="python3", with_files=bool(files),
                                  script_name=supervisor_name, timeout_seconds=timeout)
    return subprocess.run(["bash", "-c", script], input=scripts.start_files_payload(files) if files else b"",
                          capture_output=True, cwd=tmp_path, env={**os.environ, "PATH": path}, timeout=120)


def _fake_sleep(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose `sleep` logs each call (and sleeps as asked)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sleep-calls"
    (bin_dir / "sleep").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec /bin/sleep "$@"\n')
    (bin_dir / "sleep").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", calls


def test_the_start_sleeps_until_the_job_writes_its_pid_instead_of_polling(tmp_path):
    """The job's own pid write (gpuflow.procs.exec_job) wakes the waiting start; nothing polls."""
    run_dir = tmp_path / "runs" / "it's $(touch pwned)"
    path, calls = _fake_sleep(tmp_path)
    procs_py = scripts.procs_script()
    # A supervisor that takes a while, then starts its "job" the way the real one does.
    supervisor = (
        "#!/usr/bin/env bash\n"
        "python3 -c 'import time; time.sleep(0.3)'\n"
        f"python3 -I -S -c {scripts.render_script('{{p}}', p=procs_py)} exec job.proc job.pid -- true\n"
    ).encode()
    result = _start(tmp_path, run_dir, [("fake-supervisor.sh", supervisor, 0o755)], "fake-supervisor.sh", path)
    assert result.returncode == 0, result.stderr
    pid = int((run_dir / "job.pid").read_text())
    assert f"gpuflow-start: pid {pid} exit \n".encode() in result.stdout
    assert not calls.exists()  # woken by the event: no `sleep 0.05` loop ran
    assert not (run_dir / scripts.WAKE_NAME).exists() and not (tmp_path / "pwned").exists()


def test_the_start_is_woken_by_an_exit_code_too_and_says_nothing_started_when_neither_comes(tmp_path):
    run_dir = tmp_path / "run"
    path, calls = _fake_sleep(tmp_path)
    ended = b"#!/usr/bin/env bash\nprintf '3\\n' > exit_code\nprintf 'x\\n' 1<>.start-wake\n"
    result = _start(tmp_path, run_dir, [("s.sh", ended, 0o755)], "s.sh", path)
    assert result.stdout.endswith(b"gpuflow-start: pid  exit 3\n") and not calls.exists()
    assert start.started_from_answer(result.stdout) == start.Started(None, 3)

    silent = tmp_path / "run2"
    result = _start(tmp_path, silent, [("s.sh", b"#!/usr/bin/env bash\nexit 0\n", 0o755)], "s.sh", path, timeout=1)
    assert result.stdout.endswith(b"gpuflow-start: pid  exit \n")
    assert start.started_from_answer(result.stdout) is None


# A probe that cannot finish before the job's exit code exists (bounded, so that where exit_code
# waited for the probe, as it once did, the test fails instead of hanging): it says what it saw.
SLOW_PROBE = r"""
import json, os, sys, time
for _ in range(100):
    found = [d for d in os.listdir("../runs") if os.path.exists(os.path.join("../runs", d, "exit_code"))]
    if found:
        break
    time.sleep(0.05)
print(json.dumps({"python": "saw exit_code" if found else "timed out", "gpu": "none", "pip_freeze": []}))
"""


def test_the_exit_code_does_not_wait_for_the_environment_probe_and_the_manifest_still_gets_it(
    local_target, project, monkeypatch
):
    import io

    from gpuflow import jobs

    monkeypatch.setattr(scripts, "ENVIRONMENT_PROBE_PY", SLOW_PROBE)  # runs in <base>/project
    outcome = jobs.run(local_target, project_dir=project, module=None, args=job_args(1), out=io.BytesIO())
    manifest = json.loads((Path(outcome.record.local_dir) / MANIFEST_NAME).read_text())
    assert manifest["python"] == "saw exit_code"  # the exit code came first; the pull waited for the probe
    assert not (Path(outcome.record.remote_dir) / "environment.pending").exists()
