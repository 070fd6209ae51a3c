"""Which processes on a node are a run's: a pid alone is never proof.

A pid names a process only while that process lives; afterwards the kernel
hands the number to the next process (quickly in a busy pid namespace, and on
macOS every 99,999 processes).  So every pid gpuflow writes for a run comes
with the process's *identity*, taken from the process itself while it runs:

* Linux: ``linux:<boot id>:<start time>`` — field 22 of ``/proc/PID/stat``
  (clock ticks after boot) and the kernel's boot id, so neither a later
  process nor one after a reboot can match;
* elsewhere (macOS): ``ps:<start time>`` as ``ps -o lstart=`` prints it.

A record file holds one line, ``PID IDENTITY``.  A process is *proven* to be
the one recorded when it is alive (not a zombie) and its identity now equals
the recorded one; gpuflow signals nothing else.  Everything that signals a
run's processes goes through :func:`signal_run_group` /
:func:`terminate_base` here: ``gpuflow stop``, the stop before ``run
--down``'s teardown, and the termination of a sandbox instance (``down``,
``reap``, ``run --down``, an ``up`` rolled back).  Whether a run still lives
is decided here too, by the same proof (:func:`status`): ``gpuflow runs``, the
follow loop of ``run`` and ``logs -f``, and ``stop`` recording a run lost, so
no process is alive for one command and "not the job" for another.

On Linux a process is also the run's when it carries the run's marker, the
``GPUFLOW_RUN_DIR=<run dir>`` its job was started with (children inherit it):
that finds the job's children left behind when the job itself has ended, or
that moved to another process group, as a real instance's termination would.

This module is also the script those paths run on the node (``python -c``,
see :func:`gpuflow.jobs.scripts.procs_script`): standard library only,
nothing imported from gpuflow, and runnable by the Python 3.8+ of an instance.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

JOB_RECORD = "job.proc"  # the job (leader of its own session and process group)
SUPERVISOR_RECORD = "supervisor.proc"  # the supervisor (leader of its own session and process group)
JOB_PID = "job.pid"
SUPERVISOR_PID = "supervisor.pid"
EXIT_CODE = "exit_code"
MARKER = "GPUFLOW_RUN_DIR"  # the job's environment names its run directory
# `gpuflow notebook`'s Jupyter server (leader of its own session), under the node's base directory.
NOTEBOOK_RECORD = os.path.join("notebook", "server.proc")
# The spot-interruption watcher's own state, once it has settled: watching, or off (gpuflow.jobs.imds_watch).
WATCHER_STATE = "watcher.json"
# What a run directory says beyond its processes (reported by status(), read by gpuflow.jobs):
NOTICE_FILES = {
    "checkpoint": os.path.join("outputs", "checkpoint", "state.json"),  # the job's resumable checkpoint
    "interruption": "interruption.json",  # a spot interruption notice the watcher acted on
    "rebalance": "rebalance.json",  # a rebalance recommendation the watcher recorded
}


# ---------------------------------------------------------------------- identity


def identity(pid: int) -> str | None:
    """The identity of the live process ``pid``, or None (no such process, or a zombie)."""
    if not isinstance(pid, int) or pid <= 1:
        return None
    if os.path.isdir("/proc/self"):
        try:
            with open("/proc/%d/stat" % pid, "rb") as handle:
                stat = handle.read()
        except OSError:
            return None
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
                boot_id = handle.read().strip().decode()
        except OSError:  # hidden in some containers: the start time alone still tells processes apart
            boot_id = "-"
        fields = stat.rsplit(b")", 1)[-1].split()  # the name (field 2) may hold spaces and parentheses
        if len(fields) < 20 or fields[0] in (b"Z", b"X"):
            return None
        return "linux:%s:%s" % (boot_id, fields[19].decode())  # field 22: start time, in ticks after boot
    try:
        shown = subprocess.run(
            ["ps", "-o", "stat=", "-o", "lstart=", "-p", str(pid)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10,
        ).stdout.decode(errors="replace").split()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(shown) < 2 or shown[0].startswith("Z"):
        return None
    return "ps:" + " ".join(shown[1:])


def _write_atomically(path: str, text: str) -> None:
    temporary = "%s.tmp.%d" % (path, os.getpid())
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def record(path: str, pid: int) -> bool:
    """Write ``PID IDENTITY`` for the live process ``pid``; False when it is already gone."""
    known = identity(pid)
    if known is None:
        return False
    _write_atomically(path, "%d %s\n" % (pid, known))
    return True


def proven(path: str) -> int | None:
    """The pid recorded in ``path`` when that very process still runs, else None."""
    try:
        with open(path) as handle:
            pid_text, _, recorded = handle.read().strip().partition(" ")
    except OSError:
        return None
    if not pid_text.isdigit() or not recorded:
        return None
    pid = int(pid_text)
    return pid if identity(pid) == recorded else None


# ---------------------------------------------------------------------- the run's marker


def marked(prefix: str, *, exact: bool) -> list[int]:
    """Pids whose environment holds ``GPUFLOW_RUN_DIR=<prefix>`` (``exact``) or a
    value under ``<prefix>/`` — Linux only (elsewhere: none)."""
    wanted = ("%s=%s" % (MARKER, prefix.rstrip("/"))).encode()
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as handle:
                entries = handle.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        for entry in entries:
            if entry == wanted or (not exact and entry.startswith(wanted + b"/")):
                found.append(int(name))
                break
    return found


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ---------------------------------------------------------------------- signalling


def _send(pid: int, sig: int, *, group: bool) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EPERM):
            return False
        raise
    return True


def job_processes(run_dir: str) -> tuple[int | None, list[int]]:
    """The run's job: its proven leader (the pid that leads its process group),
    and the other processes of that group that carry the run's marker."""
    leader = proven(os.path.join(run_dir, JOB_RECORD))
    recorded = _recorded_pid(os.path.join(run_dir, JOB_RECORD))
    members = [pid for pid in marked(run_dir, exact=True) if recorded is not None and _group_of(pid) == recorded]
    return leader, [pid for pid in members if pid != leader]


def _recorded_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().split(" ", 1)[0]
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def signal_run_group(run_dir: str, sig: int) -> bool:
    """Send ``sig`` to the run's job: the whole group of its proven leader, and
    the marked members of that group once the leader is gone.  False when
    nothing of it runs."""
    leader, members = job_processes(run_dir)
    sent = leader is not None and _send(leader, sig, group=True)
    for pid in members:
        sent = _send(pid, sig, group=False) or sent
    return sent


def stop(run_dir: str, grace_seconds: float) -> str:
    """SIGTERM the job, SIGKILL what is left after ``grace_seconds``: 'terminated',
    'killed', 'finished' (it had just ended: its supervisor wrote the exit code)
    or 'gone' (nothing of it runs, and no exit code)."""
    if not signal_run_group(run_dir, signal.SIGTERM):
        # Ended just now? Its supervisor, while it lives, writes the exit code at once.
        deadline = time.monotonic() + 5
        exit_code = os.path.join(run_dir, EXIT_CODE)
        while not os.path.exists(exit_code) and time.monotonic() < deadline:
            if proven(os.path.join(run_dir, SUPERVISOR_RECORD)) is None:
                break
            time.sleep(0.05)
        return "finished" if os.path.exists(exit_code) else "gone"
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        leader, members = job_processes(run_dir)
        if leader is None and not members:
            return "terminated"
    return "killed" if signal_run_group(run_dir, signal.SIGKILL) else "terminated"


def terminate_base(base_dir: str) -> list[int]:
    """What a power-off does to a sandbox instance's processes: SIGKILL every
    run's proven supervisor and job (their whole process groups), the proven
    Jupyter server of `gpuflow notebook` (its group), and every
    process carrying the marker of a run under ``base_dir``.  Returns the pids signalled."""
    runs_dir = os.path.join(base_dir, "runs")
    killed = []
    try:
        run_names = sorted(os.listdir(runs_dir))
    except OSError:
        run_names = []
    for name in run_names:
        run_dir = os.path.join(runs_dir, name)
        for record_name in (SUPERVISOR_RECORD, JOB_RECORD):  # the supervisor first: it records nothing more
            leader = proven(os.path.join(run_dir, record_name))
            if leader is not None and leader != os.getpid() and _send(leader, signal.SIGKILL, group=True):
                killed.append(leader)
    notebook = proven(os.path.join(base_dir, NOTEBOOK_RECORD))
    if notebook is not None and notebook != os.getpid() and _send(notebook, signal.SIGKILL, group=True):
        killed.append(notebook)
    for prefix in sorted({runs_dir, os.path.join(os.path.realpath(base_dir), "runs")}):
        for pid in marked(prefix, exact=False):
            if _send(pid, signal.SIGKILL, group=False):
                killed.append(pid)
    return killed


def status(run_dir: str) -> dict:
    """What ``gpuflow runs``, the follow loop (``run``, ``logs -f``) and ``stop``
    know of one run directory, all from the same proof as the signalling above:

    * ``job``: 'alive' (:func:`job_processes` finds its leader or marked members:
      what :func:`stop` would signal), 'gone', or 'none' (never recorded: not started);
    * ``supervisor``: 'alive' (its recorded process is proven), 'gone' or 'none';
    * ``alive``: either is alive — a supervisor that has not started its job yet,
      or has not yet written the exit code of the job that ended, keeps the run alive;
    * ``exit_code``, read *after* the processes: a supervisor that wrote it and
      ended is never reported gone without it.
    """

    def read(name: str) -> str | None:
        try:
            with open(os.path.join(run_dir, name)) as handle:
                return handle.read().strip()
        except OSError:
            return None

    def state(alive: bool, *names: str) -> str:
        if alive:
            return "alive"
        return "gone" if any(os.path.lexists(os.path.join(run_dir, name)) for name in names) else "none"

    leader, members = job_processes(run_dir)
    job = state(leader is not None or bool(members), JOB_RECORD, JOB_PID)
    supervisor = state(proven(os.path.join(run_dir, SUPERVISOR_RECORD)) is not None, SUPERVISOR_RECORD, SUPERVISOR_PID)
    code = read(EXIT_CODE)
    pid = read(JOB_PID)
    report = {
        "exists": os.path.isdir(run_dir),
        "exit_code": int(code) if code and code.lstrip("-").isdigit() else None,
        "pid": int(pid) if pid and pid.isdigit() else None,
        "job": job,
        "supervisor": supervisor,
        "alive": "alive" in (job, supervisor),
    }
    for key, name in NOTICE_FILES.items():  # small JSON files; None when absent, too big or unreadable
        try:
            with open(os.path.join(run_dir, name), "rb") as handle:
                data = handle.read(65537)
            report[key] = json.loads(data.decode("utf-8")) if len(data) <= 65536 else None
        except (OSError, ValueError):
            report[key] = None
    return report


# ---------------------------------------------------------------------- starting a job


def _wake_start(run_dir: str) -> None:
    """Wake a start waiting for this job's pid: one line to the run directory's FIFO
    (``.start-wake``, :data:`gpuflow.jobs.scripts.WAKE_NAME`) when there is one; never blocks."""
    path = os.path.join(run_dir, ".start-wake")
    try:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            return
        handle = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody waits
    except OSError:
        return
    try:
        os.write(handle, b"x\n")
    except OSError:
        pass
    finally:
        os.close(handle)


def exec_job(record_path: str, pid_path: str, argv: list) -> None:
    """In the process that becomes the job: lead a new session (and process
    group), record this process's identity, then its pid, then exec ``argv``
    (the pid, and so the identity, stay the same across exec)."""
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    record(record_path, os.getpid())
    _write_atomically(pid_path, "%d\n" % os.getpid())
    _wake_start(os.path.dirname(pid_path) or ".")
    for name in ("SIGPIPE", "SIGXFSZ"):  # Python ignores these; the job must start with the defaults
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write("gpuflow: cannot start %s: %s\n" % (argv[0], exc))
        sys.stderr.flush()
        os._exit(127)


def main(mode: str, argv: list) -> int:
    """The node-side entry: ``python -c SOURCE`` ends by calling this with its mode."""
    if mode == "record":  # PATH PID
        return 0 if record(argv[0], int(argv[1])) else 1
    if mode == "exec":  # RECORD PIDFILE -- ARGV...
        exec_job(argv[0], argv[1], argv[3:])
    if mode == "stop":  # RUN_DIR GRACE
        print(stop(argv[0], float(argv[1])))
        return 0
    if mode == "status":  # RUN_DIR... | --all BASE
        run_dirs = argv
        if argv[:1] == ["--all"]:
            runs_dir = os.path.join(argv[1], "runs")
            names = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
            run_dirs = [os.path.join(runs_dir, name) for name in names if os.path.isdir(os.path.join(runs_dir, name))]
        print(json.dumps({run_dir: status(run_dir) for run_dir in run_dirs}))
        return 0
    if mode == "alive":  # RUN_DIR: exit 0 while its job or supervisor lives, else 1
        return 0 if status(argv[0])["alive"] else 1
    if mode == "terminate":  # BASE
        print(json.dumps(terminate_base(argv[0])))
        return 0
    sys.stderr.write("unknown mode %r\n" % mode)
    return 2
