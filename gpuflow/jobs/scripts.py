"""Every script gpuflow runs on the instance for a job, and the one way values get into them.

They are plain strings here (not package data files) so that the exact text
that runs remotely is reviewable next to the code that renders it.  A shell
script is written as one template with named holes ``{{name}}``, filled by
:func:`render_script` only: every value is shell-quoted there
(:func:`gpuflow.transport.base.quote_argv`), a sequence becomes one quoted word
per element, and only a :class:`ShellCode` constant of gpuflow's own goes in
as is.  The Python probes get their values as ``argv`` elements.  Nothing a
user typed is ever parsed by the remote shell.

* :func:`render_supervisor` — a bash script started detached (by the start's
  launcher, :mod:`gpuflow.jobs.launcher`, which records its identity in
  ``supervisor.proc``; or ``setsid -f nohup``, then it records itself) in the run
  directory.  It drops every ``AWS_*`` variable but the
  region (:data:`KEPT_AWS_VARIABLES`) before starting anything, puts the job in its own session and process
  group, which records its identity in ``job.proc`` and then its pid in
  ``job.pid`` (:mod:`gpuflow.procs`: a pid alone is never proof), appends the
  job's output to ``job.log``, touches ``<base>/heartbeat`` every
  ``heartbeat_seconds`` while the job lives (feeding the instance's
  dead-man's switch) and writes ``exit_code`` atomically when the job ends.
  Because the supervisor is a separate session and ignores SIGHUP, neither a
  dropped SSH connection nor a sleeping laptop nor gpuflow exiting touches it;
  ``gpuflow stop`` signals only the job's process group, so the supervisor
  survives to record the exit code.  It also writes ``environment.json`` (the
  probe below, run with the job's interpreter, started beside the job; ``exit_code``
  does not wait for it, ``environment.pending`` marks it running) for the run manifest.
* :func:`start_script` — one command: write the run's files (on stdin) and start the
  supervisor detached, recorded by identity, in one Python process (:func:`launcher_script`,
  :mod:`gpuflow.jobs.launcher`), and wait on the target until the job has
  started (:func:`wait_for_start_command`), woken by the write of ``job.pid``.
* :func:`prepare_environment_script` — create (once per requirements hash,
  under a lock) or reuse the job's virtualenv.
* :func:`unpack_script` — unpack a shipped tar into a directory.
* :data:`LIST_TREE_PY` — lists a run directory without following symlinks:
  path, kind (file / dir / symlink / other), size, sha256, mtime, as JSON.
* :data:`RUN_STATUS_PY` — for each run directory: whether its job and its
  supervisor still run (the recorded processes, proven by their identity) and
  its exit code: what ``gpuflow runs``, the follow loop and ``stop`` decide by.
* :data:`STOP_JOB_PY` — SIGTERM, then SIGKILL, the run's job, proven the same way.
* :data:`ENVIRONMENT_PROBE_PY` — Python and TensorFlow versions, the installed
  distributions (the content of ``pip freeze``), GPU name and driver.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpuflow import procs
from gpuflow.durable import uploader
from gpuflow.jobs import imds_watch, launcher, peer_watch
from gpuflow.transport import filestream
from gpuflow.transport.base import TAKE_LOCK_SHELL_FUNCTION, quote_argv


class ShellCode(str):
    """A fragment of shell that gpuflow itself wrote (a constant, never a user's
    value): :func:`render_script` puts it in as is."""


_HOLE = re.compile(r"\{\{(\w+)\}\}")
HoleValue = str | int | float | Sequence[str] | ShellCode


def render_script(template: str, **holes: HoleValue) -> str:
    """``template`` with each hole ``{{name}}`` filled: a string or number as one
    shell-quoted word, a sequence as one quoted word per element, a
    :class:`ShellCode` as is.  Every hole must be given, and nothing else."""
    wanted = set(_HOLE.findall(template))
    if wanted != set(holes):
        missing, unknown = sorted(wanted - set(holes)), sorted(set(holes) - wanted)
        raise ValueError(f"script holes: missing {missing}, unknown {unknown}")

    def fill(match: re.Match[str]) -> str:
        value = holes[match.group(1)]
        if isinstance(value, ShellCode):
            return str(value)
        if isinstance(value, (str, int, float)):
            return quote_argv([f"{value:g}" if isinstance(value, float) else str(value)])
        return quote_argv(list(value))

    return _HOLE.sub(fill, template)

_SUPERVISOR_TEMPLATE = r"""#!/usr/bin/env bash
# gpuflow job supervisor for run {{run_id}} (written by gpuflow; see gpuflow/jobs/scripts.py).
# Started detached with `setsid -f nohup`: survives SSH drops, laptop sleep and gpuflow exiting.
set -u
run_dir={{run_dir}}
base_dir={{base_dir}}
work_dir={{work_dir}}
heartbeat_seconds={{heartbeat_seconds}}
python={{probe_python}}
procs_py={{procs_source}}
watch_py={{watch_source}}
durable_url={{durable_url}}
durable_region={{durable_region}}
durable_endpoint={{durable_endpoint}}
durable_py={{durable_source}}
peers_py={{peers_source}}

write_atomically() { printf '%s\n' "$2" > "$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"; }
# The job's own start, once it leads its session and group (see below): bash -c JOB_START NAME RUN_DIR
# IDENTITY COMMAND...: its identity record, then its pid (each written atomically), the wake-up of a
# waiting start, then the command; nothing of it starts when a record cannot be written.
job_start='printf "%s %s\n" "$$" "$2" >"$1/job.proc.tmp.$$" && mv -f "$1/job.proc.tmp.$$" "$1/job.proc" &&
printf "%s\n" "$$" >"$1/job.pid.tmp.$$" && mv -f "$1/job.pid.tmp.$$" "$1/job.pid" || exit 1
if [ -p "$1/{{wake_name}}" ]; then printf "x\n" 1<>"$1/{{wake_name}}"; fi 2>/dev/null
shift 2
exec "$@"'

# Wakes a start waiting on the run directory's FIFO (gpuflow/jobs/scripts.py WAKE_NAME), if one is.
wake() { if [ -p "$run_dir/{{wake_name}}" ]; then printf 'x\n' 1<>"$run_dir/{{wake_name}}"; fi 2>/dev/null; }

# No AWS credential reaches the job, nor anything else started here: every
# AWS_* variable but the region goes (see KEPT_AWS_VARIABLES in gpuflow/jobs/scripts.py).
for name in ${!AWS_@}; do case "$name" in {{kept_aws}}) ;; *) unset "$name" ;; esac; done
# $GPUFLOW_IMDS_ENDPOINT, else a sandbox instance's own metadata service (infra/sandbox/imds.py
# writes its URL here), else EC2's: what the watcher and any sidecar ask.
if [ -z "${GPUFLOW_IMDS_ENDPOINT:-}" ] && [ -r "$base_dir/imds-endpoint" ]; then
  export GPUFLOW_IMDS_ENDPOINT="$(cat "$base_dir/imds-endpoint")"
fi

cd "$run_dir" || exit 1
# A pid alone is never proof: this process's identity is recorded with it (gpuflow/procs.py),
# before the pid, so that whoever sees the pid file finds the identity too.  Launching is
# idempotent: a repeated launch (after a dropped connection) finds the claim and leaves.  Started
# by the start's launcher (gpuflow/jobs/launcher.py) with "claimed", the claim and the identity
# record are made already, by the process that became this one (same pid, same start time).
if [ "${1:-}" != {{claimed}} ]; then
  mkdir .supervisor 2>/dev/null || exit 0
  "$python" -I -S -c "$procs_py" record "$run_dir/supervisor.proc" "$$" 2>>"$run_dir/job.log"
fi
mkdir -p outputs "$work_dir"
probe_pid=""
write_atomically "$run_dir/supervisor.pid" "$$"
touch "$base_dir/heartbeat"
# Heartbeat: feeds the instance's dead-man's switch while the job runs, and
# stops by itself if this supervisor is killed (a crash must not feed it forever).
(
  sleeper=""
  trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null; exit 0' TERM
  while kill -0 "$$" 2>/dev/null; do
    touch "$base_dir/heartbeat"
    sleep "$heartbeat_seconds" & sleeper=$!
    wait "$sleeper"
  done
) </dev/null >/dev/null 2>&1 &
heartbeat_pid=$!

if cd "$work_dir" 2>>"$run_dir/job.log"; then
  # Durable runs (gpuflow/durable/uploader.py): bring the newest committed checkpoint from S3
  # first when this node has none, then keep checkpoints, log and outputs in S3 while the job runs.
  durable_pid=""
  if [ -n "$durable_endpoint" ]; then export GPUFLOW_S3_ENDPOINT="$durable_endpoint"; fi
  if [ -n "$durable_url" ]; then
    "$python" -I -S -c "$durable_py" restore "$run_dir" "$durable_url" "$durable_region" \
      </dev/null >/dev/null 2>>"$run_dir/durable.log"
  fi
  # A multi-node run's watchdog (gpuflow/jobs/peer_watch.py), in this process group, not the job's:
  # it ends this node's job when a peer's failed, and answers its peers until they know how it ended.
  peers_pid=""
  if [ -f "$run_dir/peers.json" ]; then
    "$python" -I -S -c "$peers_py" "$run_dir" </dev/null >/dev/null 2>>"$run_dir/watcher.log" &
    peers_pid=$!
  fi
  # The job leads its own session and process group, which `gpuflow stop` signals; it
  # records its identity (job.proc), then its pid (job.pid), then execs the command.  On Linux
  # with setsid(1) no Python starts before the job's own: this subshell takes its identity as
  # gpuflow/procs.py does (the boot id and field 22 of /proc/PID/stat, the same across exec), then
  # setsid(1) makes this very process (no group leader, so setsid does not fork) lead its session
  # and group and runs $job_start in it; elsewhere gpuflow.procs does all of it.
  (
    read -r stat 2>/dev/null <"/proc/${BASHPID:-0}/stat" || stat=""
    set -- ${stat##*[)]}
    if [ "$#" -ge 20 ] && [ "$3" != "$BASHPID" ] && command -v setsid >/dev/null 2>&1; then
      read -r boot_id 2>/dev/null </proc/sys/kernel/random/boot_id || boot_id=""
      exec setsid bash -c "$job_start" gpuflow-job "$run_dir" "linux:${boot_id:--}:${20}" {{command}}
    fi
    exec "$python" -I -S -c "$procs_py" exec "$run_dir/job.proc" "$run_dir/job.pid" -- {{command}}
  ) </dev/null >>"$run_dir/job.log" 2>&1 &
  job_pid=$!
  # The manifest's environment facts, gathered beside the job (no extra round trip), started once the
  # job is (not to slow its start); exit_code does not wait for them: environment.pending says they
  # are still coming, and a pull waits for them.
  touch "$run_dir/environment.pending"
  ( "$python" -c {{probe_source}} >"$run_dir/environment.json.tmp" 2>/dev/null \
      && mv -f "$run_dir/environment.json.tmp" "$run_dir/environment.json"
    rm -f "$run_dir/environment.json.tmp" "$run_dir/environment.pending" ) </dev/null >/dev/null 2>&1 &
  probe_pid=$!
  # The spot-interruption watcher (gpuflow/jobs/imds_watch.py): in this process group, not the job's;
  # it turns itself off where no instance metadata service answers, and never feeds the heartbeat.
  "$python" -I -S -c "$watch_py" "$run_dir" </dev/null >/dev/null 2>>"$run_dir/watcher.log" &
  watcher_pid=$!
  if [ -n "$durable_url" ]; then
    "$python" -I -S -c "$durable_py" watch "$run_dir" "$durable_url" "$durable_region" \
      </dev/null >/dev/null 2>>"$run_dir/durable.log" &
    durable_pid=$!
  fi
  wait "$job_pid"
  code=$?
  kill "$watcher_pid" 2>/dev/null
  wait "$watcher_pid" 2>/dev/null
  if [ -n "$durable_pid" ]; then
    # the last checkpoint, the outputs and the log go up (bounded by the uploader) before exit_code appears
    write_atomically "$run_dir/.durable-exit" "$code"
    wait "$durable_pid"
  fi
  if [ -n "$peers_pid" ]; then
    write_atomically "$run_dir/job.ended" "$code"
    wait "$peers_pid"
  fi
else
  code=127
fi
kill "$heartbeat_pid" 2>/dev/null
touch "$base_dir/heartbeat"
write_atomically "$run_dir/exit_code" "$code"
wake
if [ -n "$probe_pid" ]; then wait "$probe_pid"; fi
"""


# The AWS_* variables a job (and the supervisor) keep: the region, which is no
# credential.  Every other AWS_* variable is dropped before anything starts, on a
# real instance and in the sandbox (whose "instance" is this machine, where the
# user's credentials live).  That removes the whole credential chain of the AWS
# SDKs, e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# AWS_SECURITY_TOKEN, AWS_CREDENTIAL_EXPIRATION, AWS_PROFILE, AWS_DEFAULT_PROFILE,
# AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI,
# AWS_CONTAINER_CREDENTIALS_FULL_URI, AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE],
# AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN, AWS_ROLE_SESSION_NAME,
# AWS_BEARER_TOKEN_<service> — and any variable AWS adds to it later.
KEPT_AWS_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


def job_command(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``env K=V... ARGV...`` as one argv (quoted once, later)."""
    for key in env:
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"invalid environment variable name {key!r}")
        if key.startswith("AWS_") and key not in KEPT_AWS_VARIABLES:
            raise ValueError(f"{key} is never handed to a job")
    return ["env", *(f"{key}={value}" for key, value in env.items()), *argv]


def procs_script(mode: str | None = None) -> str:
    """:mod:`gpuflow.procs` as a ``python -c`` script: ``python -c SCRIPT MODE ARGS...``,
    or with ``mode`` fixed, ``python -c SCRIPT ARGS...``."""
    source = Path(procs.__file__).read_text(encoding="utf-8")
    call = "main(sys.argv[1], sys.argv[2:])" if mode is None else f"main({mode!r}, sys.argv[1:])"
    return f"{source}\n\nsys.exit({call})\n"


def _modules_script(modules: Sequence[object], call: str) -> str:
    """Stdlib-only modules run as one ``python -c`` script: their sources in order (each but the
    first without its ``from __future__`` line: the first one covers the whole script), then
    ``sys.exit(CALL)``."""
    sources = []
    for index, module in enumerate(modules):
        source = Path(module.__file__).read_text(encoding="utf-8")  # type: ignore[attr-defined]
        if index:
            source = "\n".join(
                line for line in source.splitlines() if line.strip() != "from __future__ import annotations"
            )
        sources.append(source)
    return "\n\n".join(sources) + f"\n\nsys.exit({call})\n"


def watcher_script() -> str:
    """The spot-interruption watcher as a ``python -c`` script (``python -c SCRIPT RUN_DIR``):
    :mod:`gpuflow.procs`' source (how the job is signalled, proven by identity), then
    :mod:`gpuflow.jobs.imds_watch`'s."""
    return _modules_script((procs, imds_watch), "watch_main(sys.argv[1:], signal_run_group)")


def durable_script() -> str:
    """The durable sidecar as a ``python -c`` script (``python -c SCRIPT MODE RUN_DIR URL REGION``):
    :mod:`gpuflow.jobs.imds_watch`' source (its instance-metadata client), then
    :mod:`gpuflow.durable.uploader`'s."""
    return _modules_script((imds_watch, uploader), "durable_main(sys.argv[1:])")


def peer_watch_script() -> str:
    """A multi-node run's watchdog as a ``python -c`` script (``python -c SCRIPT RUN_DIR``):
    :mod:`gpuflow.procs`' source (how the job is signalled), then :mod:`gpuflow.jobs.peer_watch`'s."""
    return _modules_script((procs, peer_watch), "peer_main(sys.argv[1:], signal_run_group)")


def render_supervisor(
    *,
    run_id: str,
    run_dir: str,
    base_dir: str,
    work_dir: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    heartbeat_seconds: float = 30,
    probe_python: str = "python3",
    durable_url: str = "",
    durable_region: str = "",
    durable_endpoint: str = "",
) -> str:
    """The supervisor script for one run; every value is shell-quoted here.  With
    ``durable_url`` (``s3://bucket/runs/<owner>/<run>/``) the durable sidecar restores
    and uploads the run's checkpoints, log and outputs (:mod:`gpuflow.durable.uploader`);
    ``durable_endpoint`` replaces AWS's S3 endpoint (the sandbox's loopback one)."""
    if heartbeat_seconds <= 0:
        raise ValueError("heartbeat_seconds must be positive")
    return render_script(
        _SUPERVISOR_TEMPLATE,
        run_id=run_id,  # a validated name, only inside a comment
        run_dir=run_dir,
        base_dir=base_dir,
        work_dir=work_dir,
        heartbeat_seconds=float(heartbeat_seconds),
        command=job_command(argv, env),
        probe_python=probe_python,
        probe_source=ENVIRONMENT_PROBE_PY,
        procs_source=procs_script(),
        watch_source=watcher_script(),
        durable_url=durable_url,
        durable_region=durable_region,
        durable_endpoint=durable_endpoint,
        durable_source=durable_script() if durable_url else "",
        peers_source=peer_watch_script(),
        kept_aws=ShellCode("|".join(KEPT_AWS_VARIABLES)),
        wake_name=ShellCode(WAKE_NAME),
        claimed=launcher.CLAIMED,
    )


_LAUNCH = "cd {{run_dir}} && setsid -f nohup bash {{script}} </dev/null >/dev/null 2>&1"


def launch_command(run_dir: str, script_name: str = "supervisor.sh") -> str:
    """Shell line that starts the supervisor detached and returns at once.

    ``setsid -f`` forks into a new session (no controlling terminal, not in
    the SSH session's process group); ``nohup`` ignores SIGHUP; every stream
    is redirected so that the SSH channel closes without waiting for it.
    """
    return render_script(_LAUNCH, run_dir=run_dir, script=script_name)


def wait_for_start_command(run_dir: str, timeout_seconds: float = 30) -> str:
    """Shell lines that wait (on the target, no round trips) until the supervisor has written
    ``job.pid`` or ``exit_code``, asleep on the run directory's wake-up FIFO between checks."""
    return render_script("cd {{run_dir}} || exit 1\n{{open_wake}}\n{{await_start}}", run_dir=run_dir,
                         open_wake=_OPEN_WAKE, await_start=_await_start(timeout_seconds))


# The start's wake-up (one per run directory, while a start waits): the job's starter (the supervisor's
# shell, or ``gpuflow.procs.exec_job``) writes a line to it once job.pid is written, the supervisor once
# exit_code is; a waiting start holds it open.
WAKE_NAME = ".start-wake"

# Opens the wake-up FIFO on fd 3 in the run directory (the current one) before the supervisor starts,
# so no wake-up is lost; without mkfifo the wait below polls every 0.05 s instead.
_OPEN_WAKE = ShellCode(
    f'[ -p {WAKE_NAME} ] || mkfifo {WAKE_NAME} 2>/dev/null\n'
    f'woken=""; if [ -p {WAKE_NAME} ] && exec 3<>{WAKE_NAME}; then woken=1; fi'
)

# Waits (in the run directory) until job.pid or exit_code is there, or {{ticks}} x 0.05 s have passed:
# asleep on the FIFO between wake-ups (a 1 s tick as a safety net), then closes and removes it.
_AWAIT_START = r"""waited=0
while [ ! -e job.pid ] && [ ! -e exit_code ] && [ "$waited" -lt {{ticks}} ]; do
  if [ -n "$woken" ]; then read -r -t 1 -u 3 _ || waited=$((waited + 20)); else sleep 0.05; waited=$((waited + 1)); fi
done
if [ -n "$woken" ]; then exec 3<&-; rm -f {{wake}}; fi"""


def _await_start(timeout_seconds: float) -> ShellCode:
    return ShellCode(render_script(_AWAIT_START, ticks=max(1, int(timeout_seconds / 0.05)), wake=WAKE_NAME))


def launcher_script() -> str:
    """The start's one Python process on the node as a ``python -c`` script (``python -c SCRIPT
    [--unpack] RUN_DIR SUPERVISOR``): :mod:`gpuflow.procs`' source (the supervisor's identity
    record), then :mod:`gpuflow.jobs.launcher`'s (the files on stdin, the detached launch)."""
    return _modules_script((procs, launcher), "launch_main(sys.argv[1:], lambda pid: record(SUPERVISOR_RECORD, pid))")


def start_files_payload(files: Sequence[tuple[str, bytes, int]]) -> bytes:
    """``files`` (name, bytes, mode) as :func:`gpuflow.jobs.launcher.unpack_files` reads them on stdin."""
    parts = []
    for name, data, mode in files:
        if not name or "/" in name or " " in name or "\n" in name or name in (".", ".."):
            raise ValueError(f"not a run-directory file name: {name!r}")
        parts += [f"{name} {mode:o} {len(data)}\n".encode(), data]
    return b"".join([*parts, b"\n"])


_START = r"""set -u
run_dir={{run_dir}}
python={{python}}
launch_py={{launch_source}}
mkdir -p "$run_dir" && cd "$run_dir" || exit 1
{{open_wake}}
# One Python process writes the files on stdin (with --unpack) and starts the supervisor detached,
# recording its identity (gpuflow/jobs/launcher.py); a failure leaves no wake-up FIFO behind.
if ! "$python" -I -S -c "$launch_py" {{unpack}} . {{script}} 3>&-; then
  if [ -n "$woken" ]; then exec 3<&-; rm -f {{wake}}; fi
  exit 1
fi
{{await_start}}
echo "gpuflow-start: pid $(cat job.pid 2>/dev/null | tr -d '
') exit $(cat exit_code 2>/dev/null | tr -d '
')"
"""


def start_script(
    *, run_dir: str, python: str, with_files: bool, script_name: str = "supervisor.sh", timeout_seconds: float = 30
) -> str:
    """One round trip to start a run on a node: write the files on stdin (``with_files``:
    :func:`start_files_payload`) into ``run_dir`` and start the supervisor detached, both by one
    ``python`` process (:func:`launcher_script`), sleep until the job has its pid or an exit code
    (woken by the event, bounded by ``timeout_seconds``) and print ``gpuflow-start: pid PID exit
    CODE`` (each empty if not there)."""
    return render_script(
        _START,
        run_dir=run_dir,
        python=python,
        launch_source=launcher_script(),
        unpack=ShellCode("--unpack" if with_files else ""),
        open_wake=_OPEN_WAKE,
        script=script_name,
        wake=ShellCode(WAKE_NAME),
        await_start=_await_start(timeout_seconds),
    )


_AWAIT_ENVIRONMENT = r"""cd {{run_dir}} 2>/dev/null || exit 0
waited=0
while [ -e environment.pending ] && [ ! -e environment.json ] && [ "$waited" -lt {{ticks}} ]; do
  kill -0 "$(cat supervisor.pid 2>/dev/null)" 2>/dev/null || break
  sleep 0.02; waited=$((waited + 1))
done
{{show}}"""


def await_environment_script(run_dir: str, timeout_seconds: float = 30, *, show: bool = False) -> str:
    """Waits (on the target) while the supervisor's environment probe is still running
    (``environment.pending``, its supervisor alive), at most ``timeout_seconds``; with ``show``,
    then prints ``environment.json`` (nothing when there is none)."""
    return render_script(_AWAIT_ENVIRONMENT, run_dir=run_dir, ticks=max(1, int(timeout_seconds / 0.02)),
                         show=ShellCode("cat environment.json 2>/dev/null || true" if show else ""))


_RESUME = r"""
set -u
run_dir={{run_dir}}
python={{python}}
procs_py={{procs_source}}
cd "$run_dir" 2>/dev/null || { echo "gpuflow-resume: gone"; exit 3; }
# One resume at a time: check, move the last attempt aside and start the next one under a lock,
# held until the new supervisor has claimed the run (its launch does not inherit the lock).
# (Without flock — a macOS sandbox — the checks below still refuse a run that is alive again.)
exec 9>>.resume.lock
if command -v flock >/dev/null 2>&1; then flock -n 9 || { echo "gpuflow-resume: busy"; exit 3; }; fi
if "$python" -I -S -c "$procs_py" alive "$run_dir"; then echo "gpuflow-resume: alive"; exit 3; fi
if [ "$(cat exit_code 2>/dev/null)" = 0 ]; then echo "gpuflow-resume: succeeded"; exit 3; fi
attempt=1
while [ -e "attempts/$attempt" ] || [ -L "attempts/$attempt" ]; do attempt=$((attempt + 1)); done
mkdir -p "attempts/$attempt" || exit 1
for name in {{archived}}; do
  if [ -e "$name" ] || [ -L "$name" ]; then mv -f "$name" "attempts/$attempt/" || exit 1; fi
done
offset=$(( $(wc -c < job.log 2>/dev/null || echo 0) + 0 ))
echo "gpuflow-resume: attempt $attempt offset $offset"
{{open_wake}}
# The supervisor, started detached and recorded by one Python process (gpuflow/jobs/launcher.py).
"$python" -I -S -c {{launch_source}} . {{script}} 9>&- 3>&-
{{wait_for_start}}
"""

# What a run directory holds of one attempt of its job: moved to attempts/<n>/ before a resume.
ATTEMPT_FILES = (
    "exit_code", "job.pid", "job.proc", "supervisor.pid", "supervisor.proc", "interruption.json",
    "rebalance.json", "watcher.json", "watcher.log", "environment.json", ".supervisor",
    "durable.json", "durable.log", ".durable-exit", "environment.pending",
)


def resume_script(*, run_dir: str, python: str, script_name: str = "supervisor.sh") -> str:
    """Start the run's supervisor again in its own run directory (same command, same log,
    outputs and checkpoint in place): refused ('gpuflow-resume: busy|alive|succeeded|gone',
    exit 3) while another resume holds the run, its job or supervisor lives, or it succeeded;
    else the last attempt's files move to ``attempts/<n>/`` and the script prints
    ``gpuflow-resume: attempt N offset BYTES`` (the log's size before the new start)."""
    return render_script(
        _RESUME,
        run_dir=run_dir,
        python=python,
        procs_source=procs_script(),
        archived=list(ATTEMPT_FILES),
        launch_source=launcher_script(),
        script=script_name,
        open_wake=_OPEN_WAKE,
        wait_for_start=_await_start(30),
    )


_PREPARE_ENVIRONMENT = "set -eu\n" + TAKE_LOCK_SHELL_FUNCTION + r"""
env_dir={{env_dir}}
base_python={{base_python}}
requirements={{requirements}}
mkdir -p "$(dirname "$env_dir")"
take_lock "$env_dir.lock" "" ""
if [ ! -f "$env_dir/.gpuflow-ready" ]; then
  rm -rf "$env_dir"
  "$base_python" -m venv --system-site-packages "$env_dir"
  "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$env_dir/.gpuflow-ready"
  echo created
else
  echo reused
fi
"""


def prepare_environment_script(*, env_dir: str, base_python: str, requirements: str) -> str:
    """Create the virtualenv ``env_dir`` from ``base_python`` with ``requirements``
    once (under a lock, marked ready by ``.gpuflow-ready``); prints 'created' or 'reused'."""
    return render_script(_PREPARE_ENVIRONMENT, env_dir=env_dir, base_python=base_python, requirements=requirements)


_UNPACK = "mkdir -p {{directory}} && tar -xf {{archive}} -C {{directory}} && rm -f {{archive}}"


def unpack_script(archive: str, directory: str) -> str:
    """Unpack the tar ``archive`` into ``directory`` (created), then remove it."""
    return render_script(_UNPACK, archive=archive, directory=directory)


# argv: ROOT [--hash-listed] NAME...  — lists each NAME under ROOT (recursively for
# directories) without following symlinks; prints one JSON list.  With --hash-listed,
# only the files whose paths stdin lists (NUL-separated) get a sha256 (the others are
# hashed as they are streamed, gpuflow.transport.filestream).
LIST_TREE_PY = filestream.LIST_TREE_PY  # the one listing, shared with the pull's streamer

# argv: RUN_DIR... (or --all BASE: every BASE/runs/*)
# prints {run_dir: {"exists": bool, "exit_code": int|null, "pid": int|null, "job": "alive"|"gone"|"none",
#                   "supervisor": "alive"|"gone"|"none", "alive": bool}}  (gpuflow.procs.status)
RUN_STATUS_PY = procs_script("status")

# argv: RUN_DIR GRACE_SECONDS — prints 'gone', 'terminated' or 'killed'.
STOP_JOB_PY = procs_script("stop")

# Run with the job's interpreter; prints one JSON object.  Versions come from
# the installed distributions' metadata (what `pip freeze` reports) so that
# the probe neither needs pip nor pays TensorFlow's multi-second import.
ENVIRONMENT_PROBE_PY = r"""
import json, platform, subprocess, sys
from importlib import metadata
def version(*names):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None
def header(distribution):
    # Name and Version as d.metadata["Name"] and d.version give them (the first of each header),
    # read from the header block alone: parsing every METADATA whole (descriptions and all) with
    # the email parser takes 5x as long (188 packages here), and a run's pull may wait for this probe.
    text = (distribution.read_text("METADATA") or distribution.read_text("PKG-INFO")
            or distribution.read_text("") or "")
    found = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, colon, value = line.partition(":")
        if colon and line[:1] not in (" ", "\t") and key.lower() in ("name", "version") and key.lower() not in found:
            found[key.lower()] = value.lstrip(" \t")
    return found.get("name"), found.get("version")
packages = sorted({f"{name}=={version}" for name, version in map(header, metadata.distributions()) if name},
                  key=str.lower)
gpus = []
driver = None
try:
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    if query.returncode == 0:
        for line in query.stdout.strip().splitlines():
            name, _, drv = line.partition(",")
            gpus.append(name.strip())
            driver = drv.strip() or driver
except (OSError, subprocess.SubprocessError):
    pass
print(json.dumps({
    "python": platform.python_version(),
    "python_executable": sys.executable,
    "tensorflow": version("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly"),
    "keras": version("keras"),
    "gpu": ", ".join(gpus) if gpus else "none",
    "gpu_driver": driver or "none",
    "pip_freeze": packages,
}))
"""
