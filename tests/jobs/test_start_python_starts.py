"""A start runs one Python process on the node before the job's own: the launcher writes the
run's files and starts the supervisor, its identity recorded by that same process, and on Linux
the job's own identity is recorded by the supervisor's shell (it was an unpacker, the supervisor
starting Python to record itself, then Python again to record the job)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpuflow import procs
from gpuflow.jobs import scripts, start
from gpuflow.jobs.records import SUPERVISOR_NAME
from tests.waiting import wait_for

# Logs what each Python start on the "node" is for: the procs mode (record, exec), the
# launcher's first argument, or what it is (the watcher, the environment probe).
_WRAPPER = """#!/bin/sh
case "$4" in
  *"watch_main("*) what=watcher ;;
  *"peer_main("*) what=peers ;;
  *) if [ "$3" = -c ]; then what="$5"; else what=probe; fi ;;
esac
printf '%s\\n' "$what" >> {calls}
exec {python} "$@"
"""


def _python_wrapper(tmp_path: Path) -> tuple[str, Path]:
    calls = tmp_path / "python-calls"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(_WRAPPER.format(calls=calls, python=sys.executable))
    wrapper.chmod(0o755)
    return str(wrapper), calls


def _start(tmp_path: Path, run_dir: Path, python: str, argv: list[str], path: str | None = None
           ) -> subprocess.CompletedProcess[bytes]:
    supervisor = scripts.render_supervisor(
        run_id="r1", run_dir=str(run_dir), base_dir=str(tmp_path / "base"), work_dir=str(tmp_path / "base" / "project"),
        argv=argv, env={}, probe_python=python,
    )
    files = [(SUPERVISOR_NAME, supervisor.encode(), 0o755), ("manifest.json", b"{}", 0o644)]
    script = scripts.start_script(run_dir=str(run_dir), python=python, with_files=True, script_name=SUPERVISOR_NAME)
    return subprocess.run(["bash", "-c", script], input=scripts.start_files_payload(files), capture_output=True,
                          cwd=tmp_path, timeout=120, env={**os.environ, "GPUFLOW_IMDS_ENDPOINT": "http://127.0.0.1:9",
                                                          "PATH": path or os.environ["PATH"]})


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_one_python_start_before_the_job_and_the_supervisor_is_recorded_by_it(tmp_path, request):
    python, calls = _python_wrapper(tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    release = tmp_path / "release"
    request.addfinalizer(release.touch)  # a failed assertion must not leave the job waiting forever
    job = ["sh", "-c", f"while [ ! -e {release} ]; do sleep 0.02; done"]
    result = _start(tmp_path, run_dir, python, job)
    assert result.returncode == 0, result.stderr
    assert start.started_from_answer(result.stdout).pid == int((run_dir / "job.pid").read_text())

    supervisor = int((run_dir / "supervisor.pid").read_text())
    assert procs.proven(str(run_dir / "supervisor.proc")) == supervisor  # its identity, recorded for it
    assert procs.status(str(run_dir))["supervisor"] == "alive"
    assert os.getsid(supervisor) == supervisor  # detached: it leads its own session
    assert Path(f"/proc/{supervisor}/cmdline").read_bytes().split(b"\0")[:2] == [b"bash", SUPERVISOR_NAME.encode()]
    ignored = int(next(line for line in Path(f"/proc/{supervisor}/status").read_text().splitlines()
                       if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (1 - 1))  # SIGHUP ignored (nohup)
    assert not ignored & (1 << (13 - 1))  # SIGPIPE as bash gets it from a shell: the default

    job_pid = int((run_dir / "job.pid").read_text())
    assert procs.proven(str(run_dir / "job.proc")) == job_pid  # the identity gpuflow.procs takes
    assert (run_dir / "job.proc").read_text() == f"{job_pid} {procs.identity(job_pid)}\n"
    assert os.getsid(job_pid) == job_pid and os.getpgid(job_pid) == job_pid  # its own session and group
    # The job itself: the pid is published just before the recording shell execs the command (same pid).
    wait_for(lambda: Path(f"/proc/{job_pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sh", b"-c"],
             timeout=30, what="the job's pid to exec the job's command")
    assert procs.status(str(run_dir))["job"] == "alive"

    recorded = (run_dir / "supervisor.proc").read_text()
    again = _start(tmp_path, run_dir, python, job)  # a repeated start (a dropped connection) finds the claim
    assert again.returncode == 0, again.stderr
    assert (run_dir / "supervisor.proc").read_text() == recorded

    release.touch()
    _wait_for(run_dir / "exit_code")
    assert (run_dir / "exit_code").read_text().strip() == "0"
    # Each start: the launcher (it unpacks, and records the supervisor), then the job itself.
    # Was: the unpacker, the supervisor's `record`, then `exec` recording the job.
    started = [line for line in calls.read_text().splitlines() if line not in ("watcher", "probe")]
    assert started == ["--unpack", "--unpack"]
    assert not (run_dir / scripts.WAKE_NAME).exists()


def test_without_setsid_the_job_is_recorded_and_started_by_gpuflow_procs(tmp_path, request):
    """Where setsid(1) is missing (macOS), gpuflow.procs records and starts the job, as before."""
    python, calls = _python_wrapper(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "mkdir", "mkfifo", "mv", "rm", "cat", "tr", "touch", "sleep", "env", "true"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    run_dir = tmp_path / "runs" / "r1"
    release = tmp_path / "release"
    request.addfinalizer(release.touch)  # a failed assertion must not leave the job waiting forever
    result = _start(tmp_path, run_dir, python, ["sh", "-c", f"while [ ! -e {release} ]; do sleep 0.02; done"],
                    path=str(bin_dir))
    assert result.returncode == 0, result.stderr
    job_pid = int((run_dir / "job.pid").read_text())
    assert procs.proven(str(run_dir / "job.proc")) == job_pid and os.getsid(job_pid) == job_pid
    release.touch()
    _wait_for(run_dir / "exit_code")
    assert (run_dir / "exit_code").read_text().strip() == "0"
    assert [line for line in calls.read_text().splitlines() if line not in ("watcher", "probe")] == ["--unpack", "exec"]


def test_a_start_whose_files_are_refused_fails_and_leaves_no_wake_fifo(tmp_path):
    run_dir = tmp_path / "run"
    script = scripts.start_script(run_dir=str(run_dir), python=sys.executable, with_files=True)
    bad = b"../evil 644 1\nx\n"
    result = subprocess.run(["bash", "-c", script], input=bad, capture_output=True, cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and b"bad file name" in result.stderr
    assert not (tmp_path / "evil").exists()
    assert not (run_dir / scripts.WAKE_NAME).exists() and not (run_dir / ".supervisor").exists()


def test_the_job_leads_its_session_and_group_before_its_pid_is_written(tmp_path):
    """Whoever finds job.pid (`gpuflow stop`, a sandbox's termination) can signal the job's group:
    the `mv` that publishes job.pid is run by the job's process once it leads them."""
    python, _calls = _python_wrapper(tmp_path)
    bin_dir, seen = tmp_path / "bin", tmp_path / "seen"
    bin_dir.mkdir()
    (bin_dir / "mv").write_text(
        "#!/bin/sh\n"
        'case "$3" in */job.pid)\n'
        '  set -- "$@" "$(cut -d" " -f5 /proc/$PPID/stat)" "$(cut -d" " -f6 /proc/$PPID/stat)" "$PPID"\n'
        f'  echo "${{4}} ${{5}} ${{6}}" >> {seen}; set -- "$1" "$2" "$3" ;;\nesac\n'
        f'exec {shutil.which("mv")} "$@"\n'
    )
    (bin_dir / "mv").chmod(0o755)
    run_dir = tmp_path / "runs" / "r1"
    result = _start(tmp_path, run_dir, python, ["true"], path=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    group, session, mover_parent = seen.read_text().split()
    assert mover_parent == group == session == (run_dir / "job.pid").read_text().strip()
    _wait_for(run_dir / "exit_code")
