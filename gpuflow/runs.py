"""Jobs on an instance: run, follow the log, pull the outputs, list, stop.

A run is started detached on the target (see :mod:`gpuflow.remote_scripts`):
gpuflow only ever *observes* it — by reading ``job.log`` from a byte offset
and checking for ``exit_code`` — so a dropped connection, a sleeping laptop
or gpuflow exiting never touches the job, and a reconnect continues the log
exactly where it stopped.

Everything here talks to the instance through the
:class:`~gpuflow.transport.base.CommandRunner` protocol, obtained from a
:class:`RunTarget` whose ``connect`` builds a fresh runner (used again to
reconnect).  The same code therefore runs against a local directory (the
sandbox, tests) and over SSH.

Remote layout (``<base>`` is ``runner.base_dir``)::

    <base>/project/            synced project, the job's working directory
    <base>/envs/<hash>/        virtualenv per hash of the project's requirements
    <base>/runs/<run-id>/      supervisor.sh, job.pid, job.log, exit_code, outputs/, manifest.json
    <base>/heartbeat           touched while a job runs

Locally, a run's files land in ``<project>/runs/<run-id>/`` and its record in
the ``runs`` collection of the state cache.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import secrets
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from gpuflow import remote_scripts
from gpuflow.config import gpuflow_home
from gpuflow.errors import (
    GpuflowError,
    InstanceGone,
    JobFailed,
    NotFound,
    RemoteCommandFailed,
    RunLost,
    RunNotFound,
    UnreachableHost,
    UnsafePath,
    UsageError,
)
from gpuflow.records import Cluster, CommandResult, check_shape
from gpuflow.state import StateStore, atomic_write_json, validate_name
from gpuflow.transport.base import CommandRunner, quote_argv

RUNS_COLLECTION = "runs"
LOG_NAME = "job.log"
EXIT_CODE_NAME = "exit_code"
PID_NAME = "job.pid"
MANIFEST_NAME = "manifest.json"
ENVIRONMENT_NAME = "environment.json"  # written by the supervisor's probe
OUTPUTS_NAME = "outputs"
SUPERVISOR_NAME = "supervisor.sh"
# What `pull` copies from the remote run directory.
PULLED_NAMES = (OUTPUTS_NAME, LOG_NAME, MANIFEST_NAME)
READ_CHUNK = 1 << 20
TRAINING_PACKAGE = "training"

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    """Default for ``say``: library code prints nothing unless asked."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def new_run_id(now: datetime.datetime | None = None) -> str:
    """Sortable and unique enough: ``20261128-031500-1a2b`` (UTC time + 4 hex)."""
    moment = (now or _now()).astimezone(datetime.timezone.utc)
    return f"{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunTarget:
    """Where a run executes.

    ``connect`` returns a *new* runner each call: gpuflow calls it again after
    a dropped connection.  ``sync_project`` pushes the project directory to
    ``<base>/project`` (the sync helper's :func:`gpuflow.sync.sync_project`
    for real clusters); ``None`` means the project is already there.
    """

    cluster: Cluster
    connect: Callable[[], CommandRunner]
    sync_project: Callable[[Path], object] | None = None
    # Pushes a data directory to ``<base>/data/<basename>/`` (``gpuflow run --data``).
    sync_data: Callable[[Path], object] | None = None
    # Whether the instance still runs (EC2's state; a sandbox instance's directory):
    # lets a follower tell a dropped connection from a terminated instance.  None: unknown.
    instance_alive: Callable[[], bool] | None = None


@dataclass(frozen=True)
class RunRecord:
    """The local record of one run (the ``runs`` state collection)."""

    run_id: str
    cluster: str
    base_dir: str
    remote_dir: str
    command: tuple[str, ...]
    project_dir: str
    local_dir: str
    started_at: str
    status: str = "running"  # running | succeeded | failed | lost
    exit_code: int | None = None
    ended_at: str | None = None
    module: str | None = None
    # The job's outcome beyond its exit code, recorded before its files are pulled
    # (instance clock; Python version from the supervisor's probe).
    job_started_at: str | None = None
    python: str | None = None
    duration_seconds: float | None = None
    lost_reason: str | None = None  # why the run is 'lost'

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["command"] = list(self.command)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = set(cls.__dataclass_fields__)
        values = {key: value for key, value in data.items() if key in known}
        values["command"] = tuple(values.get("command", ()))
        return cls(**values)

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed")

    def status_text(self) -> str:
        return f"failed({self.exit_code})" if self.status == "failed" else self.status


@dataclass(frozen=True)
class PullReport:
    local_dir: Path
    fetched: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    changing: tuple[str, ...] = ()  # files rewritten by the job while being pulled (skipped)
    bytes_fetched: int = 0


@dataclass(frozen=True)
class RunOutcome:
    record: RunRecord
    exit_code: int | None  # None when detached
    detached: bool = False
    pull: PullReport | None = None
    stopped: bool = False


@dataclass(frozen=True)
class RunStatus:
    record: RunRecord
    status: str  # running | succeeded | failed(N) | lost | unreachable

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "status": self.status}


def _store(home: Path | None) -> StateStore:
    return StateStore(home or gpuflow_home(), RUNS_COLLECTION, shape=_check_run_record, repair_hint=_damaged_run_hint)


def _check_run_record(run_id: str, document: dict[str, Any]) -> None:
    """A run record parses into a RunRecord, stored under its own run id."""
    check_shape(RunRecord, document)
    if document["run_id"] != run_id:
        raise ValueError(f"it holds run {document['run_id']!r}, not {run_id!r}")
    validate_name(document["cluster"], "cluster name")


def _damaged_run_hint(run_id: str, raw: Any) -> str:
    return f"remove that file to forget run {run_id} (its files stay on the instance, under runs/{run_id})"


def save_record(record: RunRecord, home: Path | None = None) -> None:
    store = _store(home)
    with store.locked():
        store.put(record.run_id, record.to_dict())


def load_record(run_id: str, home: Path | None = None) -> RunRecord:
    validate_name(run_id, "run id")
    document = _store(home).get(run_id)
    if document is None:
        raise RunNotFound(f"no run {run_id!r} is known here", hint="`gpuflow runs` lists the runs")
    return RunRecord.from_dict(document)


def all_records(home: Path | None = None) -> list[RunRecord]:
    return [RunRecord.from_dict(document) for document in _store(home).all().values()]


# --------------------------------------------------------------------------- the job's command


def _target_python(runner: CommandRunner) -> str:
    """The interpreter gpuflow's own probes use on the target.

    The sandbox / test target is this machine: reuse this interpreter (it has
    the packages and starts instantly).  On an instance: ``python3``.
    """
    from gpuflow.transport.local import LocalRunner

    return sys.executable if isinstance(runner, LocalRunner) else "python3"


# Where the Deep Learning AMIs keep their framework's Python (their release notes'
# "python_location"; the PyTorch ones say /opt/pytorch/bin/python).  A
# non-interactive SSH command does not activate it, so gpuflow looks for it.
AMI_FRAMEWORK_PYTHONS = ("/opt/tensorflow/bin/python3", "/opt/tensorflow/bin/python")


def base_python(runner: CommandRunner, project_dir: Path) -> str:
    """The interpreter jobs (and their virtualenvs) start from.

    The project's ``remote_python`` setting if given; on this machine (sandbox,
    tests) the interpreter running gpuflow; on an instance the AMI's
    TensorFlow Python when present, else ``python3``.
    """
    from gpuflow.config import load_project_config

    configured = load_project_config(project_dir).get("remote_python")
    if configured:
        return str(configured)
    from gpuflow.transport.local import LocalRunner

    if isinstance(runner, LocalRunner):
        return sys.executable
    probe = "".join(
        f"[ -x {shlex.quote(path)} ] && {{ echo {shlex.quote(path)}; exit 0; }}; " for path in AMI_FRAMEWORK_PYTHONS
    )
    found = runner.run_script(probe + "command -v python3", check=False).text().strip().splitlines()
    return found[-1] if found else "python3"


def is_training_module(module: str | None) -> bool:
    return module is not None and (module == TRAINING_PACKAGE or module.startswith(TRAINING_PACKAGE + "."))


def build_job_argv(
    *, python: str, module: str | None, args: Sequence[str], output_dir: str, data_dir: str | None = None
) -> list[str]:
    """``python -m MODULE ARGS`` or the command ARGS, as an argv (never a string).

    A training module gets ``--output <run>/outputs`` (and, with ``gpuflow run
    --data``, ``--data-dir <the synced data>``) unless the user passed that
    option already.  A command starting with ``python``/``python3`` runs with
    the run's environment interpreter.
    """
    args = [str(arg) for arg in args]
    if module is not None:
        if not module.replace(".", "").replace("_", "").isalnum() or module.startswith("."):
            raise UsageError(f"{module!r} is not a Python module name", hint="e.g. training.cifar10_cnn")
        argv = [python, "-m", module, *args]
        if is_training_module(module):
            for option, value in (("--output", output_dir), ("--data-dir", data_dir)):
                given = any(arg == option or arg.startswith(option + "=") for arg in args)
                if value is not None and not given:
                    argv += [option, value]
        return argv
    if not args:
        raise UsageError("nothing to run", hint="give a module (training.cifar10_cnn) or a command after `--`")
    if args[0] in ("python", "python3"):
        return [python, *args[1:]]
    return args


# --------------------------------------------------------------------------- environment


def requirements_of(project_dir: Path) -> str | None:
    """The project's requirements as requirements.txt text, or None.

    ``requirements.txt`` wins; else ``[project].dependencies`` of pyproject.toml.
    """
    requirements = project_dir / "requirements.txt"
    if requirements.is_file():
        text = requirements.read_text()
        meaningful = [line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        return text if meaningful else None
    pyproject = project_dir / "pyproject.toml"
    if pyproject.is_file():
        from gpuflow.config import _read_toml

        dependencies = _read_toml(pyproject).get("project", {}).get("dependencies") or []
        if dependencies:
            return "\n".join(sorted(str(item) for item in dependencies)) + "\n"
    return None


def requirements_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PREPARE_ENV_SCRIPT = r"""
set -eu
env_dir={env_dir}
base_python={base_python}
requirements={requirements}
mkdir -p "$(dirname "$env_dir")"
exec 9>"$env_dir.lock"
flock 9
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


def prepare_environment(runner: CommandRunner, project_dir: Path, *, say: Say = _quiet) -> str:
    """The interpreter the job runs with.

    No requirements: :func:`base_python` (the Deep Learning AMI's, with its
    TensorFlow; this interpreter in the sandbox).  Otherwise a virtualenv
    ``<base>/envs/<hash>/`` with ``--system-site-packages`` (so the AMI's
    TensorFlow is still used), created once per requirements hash under a
    lock and reused while the marker ``.gpuflow-ready`` exists.
    """
    interpreter = base_python(runner, project_dir)
    text = requirements_of(project_dir)
    if text is None:
        return interpreter
    digest = requirements_hash(text)
    env_dir = f"{runner.base_dir}/envs/{digest}"
    requirements_path = f"{env_dir}.requirements.txt"
    runner.put_bytes(text.encode(), requirements_path)
    script = _PREPARE_ENV_SCRIPT.format(
        env_dir=shlex.quote(env_dir), base_python=shlex.quote(interpreter), requirements=shlex.quote(requirements_path)
    )
    say(f"preparing the environment {digest} (once per requirements hash)")
    result = runner.run_script(script, timeout=3600, check=False)
    if not result.ok:
        tail = (result.stderr or result.stdout).decode(errors="replace").strip()[-400:]
        raise RemoteCommandFailed(
            f"preparing the environment from the project's requirements failed: {tail}",
            hint="fix requirements.txt / [project].dependencies and run again",
        )
    if result.text().strip().endswith("reused"):
        say(f"reusing the environment {digest}")
    return f"{env_dir}/bin/python"


def _package_tarball(package_name: str) -> bytes:
    """The installed package ``package_name`` as an uncompressed tar (no caches)."""
    import importlib.util

    spec = importlib.util.find_spec(package_name)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"the {package_name!r} package is not installed here", hint="pip install gpuflow[train]")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    buffer = io.BytesIO()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
            return None
        return info

    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(package_dir, arcname=package_name, filter=keep)
    return buffer.getvalue()


def _ship_package(runner: CommandRunner, package_name: str, site_dir: str) -> None:
    tar_path = f"{site_dir}.tar"
    runner.put_bytes(_package_tarball(package_name), tar_path)
    site, archive = shlex.quote(site_dir), shlex.quote(tar_path)
    runner.run_script(f"mkdir -p {site} && tar -xf {archive} -C {site} && rm -f {archive}", timeout=120)


# --------------------------------------------------------------------------- manifest


def git_state(project_dir: Path) -> dict[str, Any] | None:
    """Commit and a hash of uncommitted changes, or None outside a git repo."""

    def git(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", "-C", str(project_dir), *argv], capture_output=True, check=False)

    try:
        head = git("rev-parse", "HEAD")
    except OSError:
        return None
    if head.returncode != 0:
        return None
    diff = git("diff", "HEAD", "--binary").stdout
    untracked = git("ls-files", "--others", "--exclude-standard").stdout.decode(errors="replace").split("\n")
    return {
        "commit": head.stdout.decode().strip(),
        "dirty": bool(diff),
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
        "untracked_files": len([name for name in untracked if name]),
    }


def build_manifest(
    *,
    record: RunRecord,
    cluster: Cluster,
    project_dir: Path,
    environment: dict[str, Any],
) -> dict[str, Any]:
    """What is known at start; the environment facts come from the
    supervisor's ``environment.json`` (merged at pull), end time and cost
    when the job has ended."""
    node = cluster.nodes[0] if cluster.nodes else None
    return {
        "run_id": record.run_id,
        "command": list(record.command),
        "module": record.module,
        "cluster": cluster.name,
        "instance_type": cluster.instance_type,
        "instance_id": node.instance_id if node else None,
        "instance_count": max(1, len(cluster.nodes)),
        "ami": cluster.ami,
        "ami_name": cluster.ami_name,
        "ami_parameter": cluster.ami_parameter,
        "region": cluster.region,
        "sandbox": cluster.sandbox,
        "price_per_hour": cluster.price_per_hour,
        "git": git_state(project_dir),
        **environment_fields(environment),
        "started_at": record.started_at,
        "job_started_at": None,
        "ended_at": None,
        "exit_code": None,
        "duration_seconds": None,
        "estimated_cost_usd": None,
    }


def environment_fields(environment: dict[str, Any]) -> dict[str, Any]:
    """The manifest's view of the environment probe (None where unknown)."""
    return {
        "gpu": environment.get("gpu"),
        "gpu_driver": environment.get("gpu_driver"),
        "python": environment.get("python"),
        "tensorflow": environment.get("tensorflow"),
        "keras": environment.get("keras"),
        "pip_freeze": environment.get("pip_freeze", []),
    }


def finish_manifest(
    manifest: dict[str, Any], *, job_started_at: str | None, ended_at: str, exit_code: int | None
) -> dict[str, Any]:
    """Add the job's start and end, exit code, duration and cost (price/h x instances x hours).

    ``started_at`` is when gpuflow started the run, on this machine's clock; the job's
    start and end are read on the instance's clock, and the duration comes from those two
    only, so a skewed laptop clock cannot distort it.  A job that never started (its
    working directory was missing) has no duration and no cost.
    """
    seconds = cost = None
    if job_started_at is not None:
        started = datetime.datetime.fromisoformat(job_started_at)
        seconds = max(0.0, (datetime.datetime.fromisoformat(ended_at) - started).total_seconds())
        price = manifest.get("price_per_hour")
        if price is not None:
            cost = round(float(price) * manifest.get("instance_count", 1) * seconds / 3600, 4)
    return {
        **manifest,
        "job_started_at": job_started_at,
        "ended_at": ended_at,
        "exit_code": exit_code,
        "duration_seconds": None if seconds is None else round(seconds, 1),
        "estimated_cost_usd": cost,
    }


# --------------------------------------------------------------------------- start


def start_run(
    target: RunTarget,
    runner: CommandRunner,
    *,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    run_id: str | None = None,
    data_dir: Path | None = None,
    heartbeat_seconds: float = 30,
    home: Path | None = None,
    say: Say = _quiet,
) -> RunRecord:
    """Sync, prepare the environment, write the manifest and start the job detached.

    ``data_dir`` (``gpuflow run --data``) is pushed to ``<base>/data/<basename>/``
    first — only what changed, so later runs reuse it — and named to the job
    in ``$GPUFLOW_DATA_DIR`` (and ``--data-dir`` for a training module).

    Returns once the supervisor has recorded the job's pid (or its exit
    code, for a job that ended at once).
    """
    project_dir = project_dir.resolve()
    run_id = validate_name(run_id or new_run_id(), "run id")
    base_dir = runner.base_dir
    remote_dir = f"{base_dir}/runs/{run_id}"
    work_dir = f"{base_dir}/project"
    if target.sync_project is not None:
        say(f"syncing {project_dir} to {target.cluster.name}")
        report = target.sync_project(project_dir)
        summary = getattr(report, "summary", None)
        if callable(summary):
            say(str(summary()))
    remote_data_dir = None
    if data_dir is not None:
        from gpuflow.sync import data_name

        if target.sync_data is None:
            raise UsageError("this target cannot receive a data directory")
        say(f"syncing data {data_dir} to {target.cluster.name}")
        report = target.sync_data(Path(data_dir))
        summary = getattr(report, "summary", None)
        if callable(summary):
            say(str(summary()))
        remote_data_dir = f"{base_dir}/data/{data_name(Path(data_dir))}"
    python = prepare_environment(runner, project_dir, say=say)
    env = {
        "GPUFLOW_RUN_ID": run_id,
        "GPUFLOW_RUN_DIR": remote_dir,
        "GPUFLOW_OUTPUT_DIR": f"{remote_dir}/{OUTPUTS_NAME}",
        "GPUFLOW_DATA_ROOT": f"{base_dir}/data",  # where `gpuflow sync --data` puts data directories
        "PYTHONUNBUFFERED": "1",
    }
    if remote_data_dir is not None:
        env["GPUFLOW_DATA_DIR"] = remote_data_dir
    if is_training_module(module) and not (project_dir / TRAINING_PACKAGE / "__init__.py").is_file():
        # `gpuflow run training.cifar10_cnn` from any directory: ship the installed package.
        site_dir = f"{remote_dir}/site"
        _ship_package(runner, TRAINING_PACKAGE, site_dir)
        env["PYTHONPATH"] = site_dir
    argv = build_job_argv(
        python=python, module=module, args=args, output_dir=f"{remote_dir}/{OUTPUTS_NAME}", data_dir=remote_data_dir
    )
    record = RunRecord(
        run_id=run_id,
        cluster=target.cluster.name,
        base_dir=base_dir,
        remote_dir=remote_dir,
        command=tuple(argv),
        project_dir=str(project_dir),
        local_dir=str(project_dir / "runs" / run_id),
        started_at=_iso(_now()),
        module=module,
    )
    script = remote_scripts.render_supervisor(
        run_id=run_id,
        run_dir=remote_dir,
        base_dir=base_dir,
        work_dir=work_dir,
        argv=argv,
        env=env,
        heartbeat_seconds=heartbeat_seconds,
        probe_python=python,
    )
    runner.put_bytes(script.encode(), f"{remote_dir}/{SUPERVISOR_NAME}", mode=0o755)
    manifest = build_manifest(record=record, cluster=target.cluster, project_dir=project_dir, environment={})
    runner.put_bytes(json.dumps(manifest, indent=2).encode(), f"{remote_dir}/{MANIFEST_NAME}")
    save_record(record, home)
    # One round trip: start the supervisor and wait (on the target) until it
    # has recorded the job's pid.
    try:
        launched = _launch(
            runner,
            f"{remote_scripts.launch_command(remote_dir, SUPERVISOR_NAME)} && "
            f"{remote_scripts.wait_for_start_command(remote_dir)}",
        )
        if not launched.ok:
            raise RemoteCommandFailed(
                f"could not start the job supervisor: {launched.stderr.decode(errors='replace').strip()[-300:]}",
                hint="the instance needs bash, setsid (util-linux) and nohup",
            )
        _wait_for_start(runner, remote_dir)
    except GpuflowError as exc:  # the record must not say 'running' for a job nobody saw start
        save_record(replace(record, status="lost", lost_reason=f"its job was not seen to start: {exc.message}"), home)
        raise
    say(f"run {run_id} started on {target.cluster.name}: {quote_argv(argv)}")
    return record


def _launch(runner: CommandRunner, launch: str, attempts: int = 3) -> CommandResult:
    """Run the launch line; repeat it when the connection drops mid-command
    (safe: the supervisor claims the run directory, so a second start is a no-op)."""
    for attempt in range(1, attempts + 1):
        try:
            return runner.run_script(launch, timeout=120, check=False)
        except InstanceGone:
            raise
        except UnreachableHost:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _read_small(runner: CommandRunner, path: str) -> str | None:
    """A small remote file's text, or None when it does not exist (yet)."""
    try:
        data = runner.read_from(path, 0, 4096)
    except (NotFound, RemoteCommandFailed, FileNotFoundError):
        return None
    text = data.decode(errors="replace").strip()
    return text or None


def _read_exit_code(runner: CommandRunner, remote_dir: str) -> int | None:
    text = _read_small(runner, f"{remote_dir}/{EXIT_CODE_NAME}")
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _wait_for_start(runner: CommandRunner, remote_dir: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _read_small(runner, f"{remote_dir}/{PID_NAME}") or _read_exit_code(runner, remote_dir) is not None:
            return
        time.sleep(0.05)
    raise RemoteCommandFailed(
        f"the job supervisor did not start within {timeout:g}s",
        hint=f"look at {remote_dir} on the instance (setsid, bash and python3 must exist there)",
    )


# --------------------------------------------------------------------------- follow the log


def _instance_gone(target: RunTarget) -> str | None:
    """Why the target's instance is known to be gone (its ``instance_alive``
    says so), or None: it runs, or nobody can tell right now."""
    if target.instance_alive is None:
        return None
    try:
        if target.instance_alive():
            return None
    except GpuflowError:
        return None  # the cloud could not say: not a reason to give up
    nodes = target.cluster.nodes
    which = nodes[0].instance_id if nodes else f"(cluster {target.cluster.name})"
    return f"its instance {which} is no longer running"


@dataclass
class _Connection:
    """The current runner and how to replace it after a drop (local to one call)."""

    target: RunTarget
    runner: CommandRunner
    reconnect_timeout: float
    say: Say
    reconnects: int = 0

    def instance_gone(self) -> str | None:
        return _instance_gone(self.target)

    def reconnect(self, error: Exception) -> None:
        if isinstance(error, InstanceGone):
            raise error
        with contextlib.suppress(Exception):
            self.runner.close()
        self.say(f"connection lost ({error}); reconnecting — the job keeps running")
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.25
        last_error: Exception = error
        while time.monotonic() < deadline:
            gone = self.instance_gone()  # a terminated instance never answers: stop asking it
            if gone is not None:
                raise InstanceGone(gone) from last_error
            try:
                runner = self.target.connect()
                runner.run(["true"], timeout=30)
            except InstanceGone:
                raise
            except (UnreachableHost, OSError, EOFError) as exc:
                last_error = exc
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.runner = runner
            self.reconnects += 1
            self.say("reconnected")
            return
        raise UnreachableHost(
            f"cannot reach {self.target.cluster.name} for {self.reconnect_timeout:g}s: {last_error}",
            hint="the job keeps running; reattach later with `gpuflow logs RUN -f`",
        ) from last_error


_TRANSIENT = (UnreachableHost, OSError, EOFError)

# While following a job without an exit code, how often gpuflow checks that it
# still lives (one short command on the instance): a job that vanished is
# noticed within about this long.
LIVENESS_INTERVAL = 5.0


@dataclass(frozen=True)
class Liveness:
    """What :func:`gpuflow.procs.status` found in a run directory (the same proof
    ``gpuflow runs``, ``stop`` and a sandbox termination use)."""

    exists: bool
    job: str  # alive | gone | none (never recorded: not started)
    supervisor: str  # alive | gone | none
    exit_code: int | None
    alive: bool  # the job or its supervisor


def run_status(runner: CommandRunner, *run_dirs: str) -> dict[str, dict[str, Any]]:
    """:data:`~gpuflow.remote_scripts.RUN_STATUS_PY` on the target: for each run
    directory (or ``"--all", BASE``), whether its job and its supervisor are
    proven alive (:func:`gpuflow.procs.status`) and its exit code."""
    # From "/": the check must work when the base directory itself is gone.
    argv = [_target_python(runner), "-I", "-S", "-c", remote_scripts.RUN_STATUS_PY, *run_dirs]
    return json.loads(runner.run(argv, cwd="/", timeout=60).stdout)


def job_liveness(runner: CommandRunner, remote_dir: str) -> Liveness | None:
    """Whether the run's job or its supervisor still lives, each proven by its
    recorded identity (a reused pid is not the job); None when the check itself
    failed.  Connection failures are raised (the caller reconnects)."""
    try:
        report = run_status(runner, remote_dir)[remote_dir]
        code = report.get("exit_code")
        return Liveness(
            exists=bool(report["exists"]),
            job=str(report["job"]),
            supervisor=str(report["supervisor"]),
            exit_code=int(code) if code is not None else None,
            alive=bool(report["alive"]),
        )
    except (RemoteCommandFailed, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


class JobVanished(Exception):
    """Raised by :func:`follow_log`: the job is gone without an exit code (``reason`` says how)."""

    def __init__(self, reason: str, offset: int, *, run_dir_exists: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset
        self.run_dir_exists = run_dir_exists


def _vanished(connection: _Connection, remote_dir: str) -> tuple[str, bool] | None:
    """(why, whether the run directory is still there) when the job is gone
    without an exit code; None while it lives, has ended, or nobody can tell."""
    liveness = job_liveness(connection.runner, remote_dir)
    if liveness is None or liveness.exit_code is not None or liveness.alive:
        return None
    gone = connection.instance_gone()
    if gone is not None:
        return gone, liveness.exists
    return _lost_reason(liveness, remote_dir), liveness.exists


def _lost_reason(liveness: Liveness, remote_dir: str) -> str:
    """Why a run whose job is not alive and has no exit code is lost."""
    if not liveness.exists:
        return f"its run directory {remote_dir} is gone"
    if liveness.job == "none":
        return "its supervisor is gone and never started the job"
    return "the job's process is gone without an exit code (its supervisor is gone too)"


def follow_log(
    connection: _Connection,
    remote_dir: str,
    out: BinaryIO,
    *,
    offset: int = 0,
    poll_interval: float = 0.5,
    follow: bool = True,
    liveness_interval: float = LIVENESS_INTERVAL,
) -> tuple[int | None, int]:
    """Copy ``job.log`` from byte ``offset`` to ``out``; with ``follow`` until
    the job has ended and the log is fully read.

    Returns (exit code or None, final offset).  The offset advances only by
    bytes already written to ``out``, and the exit code is checked *before*
    the final read, so after a reconnect nothing is repeated or lost.

    While following, every ``liveness_interval`` seconds without an exit code
    the job is checked by identity (:func:`job_liveness`): a job whose process
    and supervisor are gone, a deleted run directory or a terminated instance
    end the loop with :class:`JobVanished` (after the log is drained).
    """
    log_path = f"{remote_dir}/{LOG_NAME}"

    def drain() -> None:
        nonlocal offset
        while chunk := connection.runner.read_from(log_path, offset, READ_CHUNK):
            out.write(chunk)
            out.flush()
            offset += len(chunk)

    next_check = time.monotonic() + liveness_interval
    try:
        while True:
            try:
                exit_code = _read_exit_code(connection.runner, remote_dir)
                drain()
                if exit_code is None and follow and time.monotonic() >= next_check:
                    vanished = _vanished(connection, remote_dir)
                    next_check = time.monotonic() + liveness_interval
                    if vanished is not None:
                        drain()  # its last words, written before it died
                        raise JobVanished(vanished[0], offset, run_dir_exists=vanished[1])
            except _TRANSIENT as exc:
                connection.reconnect(exc)  # raises InstanceGone for a terminated instance
                continue
            if exit_code is not None or not follow:
                return exit_code, offset
            time.sleep(poll_interval)
    except InstanceGone as exc:
        if not follow:
            raise
        reason = connection.instance_gone() or f"its instance is gone ({exc.message})"
        raise JobVanished(reason, offset, run_dir_exists=False) from exc


# --------------------------------------------------------------------------- pull


def _safe_destination(local_root: Path, relative: str) -> Path | None:
    """Where a remote entry may land locally, or None if it would escape."""
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    posix = PurePosixPath(relative)
    if posix.is_absolute() or any(part in ("..", ".", "") for part in relative.split("/")):
        return None
    destination = local_root.joinpath(*posix.parts)
    root = local_root.resolve()
    resolved = destination.resolve()
    if resolved != root and root not in resolved.parents:
        return None
    return destination


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_remote_tree(runner: CommandRunner, remote_dir: str, names: Sequence[str] = PULLED_NAMES) -> list[dict]:
    result = runner.run([_target_python(runner), "-c", remote_scripts.LIST_TREE_PY, remote_dir, *names], timeout=600)
    try:
        entries = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise RemoteCommandFailed("the remote run directory listing is unreadable") from exc
    if not isinstance(entries, list):
        raise RemoteCommandFailed("the remote run directory listing is not a list")
    return entries


def pull_files(
    runner: CommandRunner,
    remote_dir: str,
    local_dir: Path,
    *,
    say: Say = _quiet,
    entries: list[dict] | None = None,
) -> PullReport:
    """Copy the run's outputs, log and manifest into ``local_dir``, verified by sha256.

    Refuses (:class:`UnsafePath`) any entry that is a symlink or special file,
    whose path is absolute or has ``..``, or that would resolve outside
    ``local_dir`` — after copying the safe entries.  A file the job rewrites
    while it is being pulled (a checkpoint) is skipped and reported.
    """
    local_dir.mkdir(parents=True, exist_ok=True)
    if entries is None:
        entries = list_remote_tree(runner, remote_dir)
    refused: list[str] = []
    fetched: list[str] = []
    unchanged: list[str] = []
    changing: list[str] = []
    total = 0
    for entry in entries:
        relative = str(entry.get("path", ""))
        kind = entry.get("kind")
        destination = _safe_destination(local_dir, relative)
        if destination is None or kind not in ("file", "dir"):
            refused.append(relative)
            continue
        if kind == "dir":
            destination.mkdir(parents=True, exist_ok=True)
            continue
        expected = str(entry.get("sha256", ""))
        if destination.is_file() and not destination.is_symlink() and _sha256_file(destination) == expected:
            unchanged.append(relative)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.gpuflow-part")
        if _safe_destination(local_dir, str(temporary.relative_to(local_dir))) is None:
            refused.append(relative)
            continue
        try:
            runner.get_file(f"{remote_dir}/{relative}", str(temporary))
            actual = _sha256_file(temporary)
            if actual != expected:
                changing.append(relative)
                continue
            os.replace(temporary, destination)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        fetched.append(relative)
        total += int(entry.get("size", 0))
    report = PullReport(
        local_dir=local_dir,
        fetched=tuple(fetched),
        unchanged=tuple(unchanged),
        changing=tuple(changing),
        bytes_fetched=total,
    )
    if changing:
        say(f"skipped {len(changing)} file(s) the job is still writing: {', '.join(changing[:5])}")
    if refused:
        shown = ", ".join(repr(name) for name in refused[:5])
        raise UnsafePath(
            f"refused {len(refused)} remote entr{'y' if len(refused) == 1 else 'ies'} that are symlinks, "
            f"special files or escape {local_dir}: {shown}",
            hint="the other files were pulled; write plain files under $GPUFLOW_OUTPUT_DIR",
        )
    return report


def _finalize_local(
    local_dir: Path,
    environment: dict[str, Any] | None,
    exit_code: int | None,
    job_started_at: str | None,
    ended_at: str | None,
    record: RunRecord | None = None,
) -> None:
    """Complete the pulled manifest with the environment facts, job times, exit code, duration and cost.

    When the instance's manifest did not arrive as a JSON object (refused as a
    symlink, or rewritten by the job) and the job has ended, a manifest with
    what ``record`` knows still records the outcome."""
    manifest_path = local_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        if record is None or exit_code is None:
            return
        manifest = {
            "run_id": record.run_id,
            "command": list(record.command),
            "module": record.module,
            "cluster": record.cluster,
            "started_at": record.started_at,
        }
    if environment:
        manifest.update(environment_fields(environment))
    if exit_code is not None and ended_at is not None:
        manifest = finish_manifest(manifest, job_started_at=job_started_at, ended_at=ended_at, exit_code=exit_code)
    atomic_write_json(manifest_path, manifest, mode=0o644)


def _instance_time(entries: list[dict], name: str) -> str | None:
    """The mtime of run-directory file ``name``, on the instance's clock (None if absent).

    The supervisor writes ``job.pid`` as the job starts and ``exit_code`` as it ends.
    """
    for entry in entries:
        if entry.get("path") == name and entry.get("mtime") is not None:
            moment = datetime.datetime.fromtimestamp(float(entry["mtime"]), datetime.timezone.utc)
            return _iso(moment)
    return None


def _read_environment(runner: CommandRunner, remote_dir: str) -> dict[str, Any] | None:
    """The supervisor's environment probe, or None while it is not there yet."""
    chunks, offset = [], 0
    while chunk := runner.read_from(f"{remote_dir}/{ENVIRONMENT_NAME}", offset, READ_CHUNK):
        chunks.append(chunk)
        offset += len(chunk)
    try:
        document = json.loads(b"".join(chunks)) if chunks else None
    except json.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _status_for(exit_code: int | None) -> str:
    if exit_code is None:
        return "running"
    return "succeeded" if exit_code == 0 else "failed"


def _record_outcome(
    record: RunRecord,
    *,
    exit_code: int,
    job_started_at: str | None,
    ended_at: str | None,
    environment: dict[str, Any] | None,
    home: Path | None,
) -> RunRecord:
    """Write the job's outcome to its record (before any file is pulled)."""
    duration = None
    if job_started_at is not None and ended_at is not None:
        duration = finish_manifest({}, job_started_at=job_started_at, ended_at=ended_at, exit_code=exit_code)[
            "duration_seconds"
        ]
    record = replace(
        record,
        status=_status_for(exit_code),
        exit_code=exit_code,
        ended_at=ended_at or record.ended_at,
        job_started_at=job_started_at or record.job_started_at,
        python=(environment or {}).get("python") or record.python,
        duration_seconds=duration if duration is not None else record.duration_seconds,
        lost_reason=None,
    )
    save_record(record, home)
    return record


def pull_run(
    record: RunRecord, runner: CommandRunner, *, home: Path | None = None, say: Say = _quiet
) -> tuple[RunRecord, PullReport]:
    """Pull a run's files (while it runs: the latest outputs) and update its record.

    The job's outcome (exit code, start and end, Python, duration) is recorded
    first, and completes the local manifest whatever the pull finds (a refused
    entry raises :class:`UnsafePath` after the safe files are pulled).
    """
    local_dir = Path(record.local_dir)
    exit_code = _read_exit_code(runner, record.remote_dir)
    # One listing serves both: the files to pull, and the job's start and end times
    # (job.pid's and exit_code's mtimes, both on the instance's clock).
    listing = list_remote_tree(runner, record.remote_dir, (*PULLED_NAMES, PID_NAME, EXIT_CODE_NAME))
    job_started_at = _instance_time(listing, PID_NAME)
    ended_at = _instance_time(listing, EXIT_CODE_NAME) if exit_code is not None else None
    environment = _read_environment(runner, record.remote_dir)
    if exit_code is not None:
        record = _record_outcome(
            record, exit_code=exit_code, job_started_at=job_started_at, ended_at=ended_at,
            environment=environment, home=home,
        )
    entries = [entry for entry in listing if entry.get("path") not in (PID_NAME, EXIT_CODE_NAME)]
    try:
        report = pull_files(runner, record.remote_dir, local_dir, say=say, entries=entries)
    finally:  # also after a refused entry: the manifest pulled with the safe files is completed
        _finalize_local(local_dir, environment, exit_code, job_started_at, ended_at, record)
    say(
        f"pulled {len(report.fetched)} file(s), {report.bytes_fetched:,} bytes "
        f"({len(report.unchanged)} unchanged) into {local_dir}"
    )
    return record, report


# --------------------------------------------------------------------------- stop


def stop_job(runner: CommandRunner, remote_dir: str, *, grace_seconds: float = 10) -> str:
    """SIGTERM the job's process group, SIGKILL after ``grace_seconds``.

    Returns 'finished' (it had already ended), 'terminated', 'killed' or 'gone'.
    The supervisor is outside that group and records the exit code.  Only the
    process recorded with its identity is signalled (:mod:`gpuflow.procs`): a
    process that merely reuses the job's pid is never touched ('gone').
    """
    if _read_exit_code(runner, remote_dir) is not None:
        return "finished"
    pid_text = _read_small(runner, f"{remote_dir}/{PID_NAME}")
    if pid_text is None or not pid_text.isdigit() or int(pid_text) <= 1:
        raise RemoteCommandFailed(f"{remote_dir}/{PID_NAME} holds no job pid", hint="the job may not have started")
    grace = max(0.0, float(grace_seconds))
    argv = [_target_python(runner), "-I", "-S", "-c", remote_scripts.STOP_JOB_PY, remote_dir, f"{grace:g}"]
    outcome = runner.run(argv, timeout=grace + 60).text().strip() or "terminated"
    if outcome == "gone":
        return outcome
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _read_exit_code(runner, remote_dir) is None:
        time.sleep(0.1)
    return outcome


# --------------------------------------------------------------------------- use cases


def run(
    target: RunTarget,
    *,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    out: BinaryIO,
    detach: bool = False,
    on_interrupt: Callable[[RunRecord], str] | None = None,
    home: Path | None = None,
    say: Say = _quiet,
    heartbeat_seconds: float = 30,
    poll_interval: float = 0.5,
    reconnect_timeout: float = 300,
    run_id: str | None = None,
    data_dir: Path | None = None,
    liveness_interval: float = LIVENESS_INTERVAL,
) -> RunOutcome:
    """``gpuflow run``: start detached, stream the log, pull, return the outcome.

    Raises :class:`JobFailed` (carrying the job's exit code) when the job
    fails, after its outputs are pulled.  On Ctrl-C, ``on_interrupt(record)``
    answers 'stop' (stop the job, pull, fail) or 'detach' (leave it running);
    without it gpuflow detaches.  A job that vanishes without an exit code
    (:func:`follow_log`) makes the run ``lost``: :class:`RunLost`, after what
    is left of its files is pulled.

    The job's outcome is recorded before its files are pulled.  When the pull
    fails (a refused entry, an unreachable instance), a failed job still raises
    :class:`JobFailed` with its own exit code, naming the pull's failure too; a
    succeeded job raises the pull's error, saying that the job succeeded.
    """
    connection = _Connection(target, target.connect(), reconnect_timeout, say)
    try:
        record = start_run(
            target,
            connection.runner,
            project_dir=project_dir,
            module=module,
            args=args,
            run_id=run_id,
            data_dir=data_dir,
            heartbeat_seconds=heartbeat_seconds,
            home=home,
            say=say,
        )
        if detach:
            return RunOutcome(record, None, detached=True)
        stopped = False
        offset = 0
        while True:
            try:
                exit_code, offset = follow_log(
                    connection, record.remote_dir, out, offset=offset, poll_interval=poll_interval,
                    liveness_interval=liveness_interval,
                )
                break
            except JobVanished as vanished:
                if vanished.run_dir_exists:  # what the job left (its log, a checkpoint) is still worth having
                    try:
                        _pull_with_reconnect(connection, record, home=home, say=say)
                    except GpuflowError as pull_error:
                        say(f"pulling what the lost run left failed: {pull_error.one_line()}")
                raise _lose(record, vanished.reason, home) from vanished
            except KeyboardInterrupt:
                choice = on_interrupt(record) if on_interrupt is not None else "detach"
                if choice != "stop":
                    return RunOutcome(record, None, detached=True)
                say(f"stopping run {record.run_id}")
                stop_job(connection.runner, record.remote_dir)
                stopped = True
        # The outcome is known now: record it before the pull, which may fail.
        record = replace(record, status=_status_for(exit_code), exit_code=exit_code, lost_reason=None)
        save_record(record, home)
        ended = f"{'was stopped' if stopped else 'failed'} with exit code {exit_code}"
        try:
            record, report = _pull_with_reconnect(connection, record, home=home, say=say)
        except GpuflowError as pull_error:
            if exit_code == 0:  # the pull's own failure decides: say that the job itself succeeded
                pull_error.message = (
                    f"run {record.run_id} succeeded, but pulling its files failed: {pull_error.message}"
                )
                raise
            # A failed job's exit code wins; the pull's failure is reported with it.
            raise JobFailed(
                f"run {record.run_id} {ended}; pulling its files failed too: {pull_error.one_line()}",
                job_exit_code=int(exit_code),
                hint=f"what was pulled is in {record.local_dir}",
            ) from pull_error
        outcome = RunOutcome(record, exit_code, pull=report, stopped=stopped)
        if exit_code != 0:
            raise JobFailed(
                f"run {record.run_id} {ended}",
                job_exit_code=int(exit_code),
                hint=f"its log and outputs are in {record.local_dir}",
            )
        return outcome
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def _pull_with_reconnect(
    connection: _Connection, record: RunRecord, *, home: Path | None, say: Say
) -> tuple[RunRecord, PullReport]:
    for _attempt in range(5):
        try:
            return pull_run(record, connection.runner, home=home, say=say)
        except _TRANSIENT as exc:
            connection.reconnect(exc)
    return pull_run(record, connection.runner, home=home, say=say)


def _lose(record: RunRecord, reason: str, home: Path | None) -> RunLost:
    """Record the run as lost (and why); the error that says so."""
    save_record(replace(record, status="lost", lost_reason=reason), home)
    return RunLost(
        f"run {record.run_id} is lost: {reason}",
        hint=f"its outcome is unknown; what was pulled is in {record.local_dir}",
    )


TargetResolver = Callable[[str], RunTarget]


def target_for_cluster(cluster_name: str) -> RunTarget:
    """The default resolver: the cluster's record, its runner and the project sync."""
    from gpuflow import clusters, remote

    cluster = clusters.get_cluster(cluster_name)

    def sync_project(project_dir: Path) -> object:
        from gpuflow import sync

        return sync.sync_project(cluster, project_dir)

    def sync_data(data_dir: Path) -> object:
        from gpuflow import sync

        return sync.sync_data(cluster, data_dir)

    def instance_alive() -> bool:
        if cluster.sandbox:
            # A sandbox instance's disk is its directory, deleted when it is terminated
            # (down, reap); asking the sandbox's EC2 could start a server that the last
            # `down` already stopped.
            return remote.sandbox_directory(cluster).is_dir()
        return remote.instance_alive_hook(cluster, cluster.head.instance_id)()

    return RunTarget(
        cluster=cluster, connect=lambda: remote.runner_for(cluster), sync_project=sync_project, sync_data=sync_data,
        instance_alive=instance_alive,
    )


def logs(
    run_id: str,
    *,
    out: BinaryIO,
    follow: bool = False,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    say: Say = _quiet,
    poll_interval: float = 0.5,
    reconnect_timeout: float = 300,
    liveness_interval: float = LIVENESS_INTERVAL,
) -> int | None:
    """``gpuflow logs RUN [-f]``: print the log (and keep following it).

    Returns the job's exit code if it has ended, else None.  Following a job
    that vanishes without an exit code (or whose cluster is gone) records the
    run as lost and raises :class:`RunLost` with the reason.
    """
    record = load_record(run_id, home)
    following = follow and not record.finished
    try:
        target = resolve(record.cluster)
        # Connecting to a terminated sandbox instance would re-create its directory: ask first.
        gone = _instance_gone(target) if following else None
        if gone is not None:
            raise _lose(record, gone, home)
        runner = target.connect()
    except (NotFound, InstanceGone) as exc:
        if not following:
            raise
        raise _lose(record, f"its cluster {record.cluster} is gone ({exc.message})", home) from exc
    connection = _Connection(target, runner, reconnect_timeout, say)
    try:
        try:
            exit_code, _offset = follow_log(
                connection, record.remote_dir, out, poll_interval=poll_interval, follow=follow,
                liveness_interval=liveness_interval,
            )
        except JobVanished as vanished:
            if record.finished:  # its outcome is known: a run directory deleted since does not change it
                raise NotFound(
                    f"run {record.run_id} {record.status_text()}, but {vanished.reason}",
                    hint=f"its pulled log is in {record.local_dir}",
                ) from vanished
            raise _lose(record, vanished.reason, home) from vanished
        if exit_code is not None and not record.finished:
            save_record(replace(record, status=_status_for(exit_code), exit_code=exit_code, lost_reason=None), home)
        return exit_code
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def pull(
    run_id: str,
    *,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    say: Say = _quiet,
) -> tuple[RunRecord, PullReport]:
    """``gpuflow pull RUN``: fetch the run's files now (also while it runs)."""
    record = load_record(run_id, home)
    target = resolve(record.cluster)
    connection = _Connection(target, target.connect(), 60, say)
    try:
        try:
            return _pull_with_reconnect(connection, record, home=home, say=say)
        except UnsafePath as refusal:  # the job's outcome was recorded all the same: say it too
            refusal.message = f"run {run_id}: job {load_record(run_id, home).status_text()}; {refusal.message}"
            raise
    finally:
        with contextlib.suppress(Exception):
            connection.runner.close()


def stop(
    run_id: str,
    *,
    grace_seconds: float = 10,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
) -> tuple[RunRecord, str]:
    """``gpuflow stop RUN``: SIGTERM the job's process group, SIGKILL after the grace period."""
    record = load_record(run_id, home)
    target = resolve(record.cluster)
    runner = target.connect()
    liveness = None
    try:
        outcome = stop_job(runner, record.remote_dir, grace_seconds=grace_seconds)
        exit_code = _read_exit_code(runner, record.remote_dir)
        if exit_code is None:  # nobody recorded how it ended: is anything of it left?
            liveness = job_liveness(runner, record.remote_dir)
    finally:
        with contextlib.suppress(Exception):
            runner.close()
    if exit_code is not None:
        record = replace(record, status=_status_for(exit_code), exit_code=exit_code, ended_at=_iso(_now()))
        save_record(record, home)
    elif (liveness is None and outcome == "gone") or (
        liveness is not None and liveness.exit_code is None and not liveness.alive
    ):
        # no exit code and no process proven to be the job or its supervisor: what `runs` calls lost
        reason = _lost_reason(liveness, record.remote_dir) if liveness is not None else "no process of the job is left"
        record = replace(record, status="lost", lost_reason=reason)
        save_record(record, home)
    return record, outcome


def _classify(report: dict[str, Any]) -> tuple[str, int | None]:
    exit_code = report.get("exit_code")
    if exit_code is not None:
        return _status_for(int(exit_code)), int(exit_code)
    if report.get("alive"):
        return "running", None
    return "lost", None


def list_runs(
    *,
    resolve: TargetResolver = target_for_cluster,
    home: Path | None = None,
    refresh: bool = True,
) -> list[RunStatus]:
    """``gpuflow runs``: every known run with its status, newest first.

    Runs not known to be finished are checked on their cluster (one command
    per cluster): 'running', 'succeeded', 'failed(N)', or 'lost' (no exit code
    and no live job, or the cluster is gone); 'unreachable' when the cluster
    cannot be reached right now.
    """
    records = sorted(all_records(home), key=lambda record: record.run_id, reverse=True)
    statuses: dict[str, str] = {}
    if refresh:
        by_cluster: dict[str, list[RunRecord]] = {}
        for record in records:
            if not record.finished:
                by_cluster.setdefault(record.cluster, []).append(record)
        for cluster_name, pending in by_cluster.items():
            statuses.update(_refresh_cluster(cluster_name, pending, resolve=resolve, home=home))
    result = []
    for record in records:
        if record.run_id in statuses:
            record = load_record(record.run_id, home)
            status = statuses[record.run_id]
        else:
            status = record.status_text()
        result.append(RunStatus(record, status))
    return result


def _refresh_cluster(
    cluster_name: str, pending: list[RunRecord], *, resolve: TargetResolver, home: Path | None
) -> dict[str, str]:
    try:
        target = resolve(cluster_name)
        runner = target.connect()
    except (NotFound, InstanceGone) as exc:  # the cluster or its instance is gone: so are its runs
        return _mark_lost(pending, home, f"its cluster {cluster_name} is gone ({exc.message})")
    except GpuflowError:  # cannot tell right now (network, credentials, host key): say so, keep the record
        return {record.run_id: "unreachable" for record in pending}
    try:
        reports = run_status(runner, *(record.remote_dir for record in pending))
    except InstanceGone as exc:
        return _mark_lost(pending, home, f"its instance is gone ({exc.message})")
    except (GpuflowError, OSError, json.JSONDecodeError):
        return {record.run_id: "unreachable" for record in pending}
    finally:
        with contextlib.suppress(Exception):
            runner.close()
    statuses = {}
    for record in pending:
        status, exit_code = _classify(reports.get(record.remote_dir, {}))
        if status != record.status or exit_code != record.exit_code:
            reason = "no exit code and no live job" if status == "lost" else None
            save_record(replace(record, status=status, exit_code=exit_code, lost_reason=reason), home)
        statuses[record.run_id] = f"failed({exit_code})" if status == "failed" else status
    return statuses


def _mark_lost(pending: list[RunRecord], home: Path | None, reason: str) -> dict[str, str]:
    for record in pending:
        if record.status != "lost" or not record.lost_reason:  # the first reason found stays
            save_record(replace(record, status="lost", lost_reason=reason), home)
    return {record.run_id: "lost" for record in pending}


__all__ = [
    "PullReport",
    "RunOutcome",
    "RunRecord",
    "RunStatus",
    "RunTarget",
    "build_job_argv",
    "list_runs",
    "logs",
    "new_run_id",
    "prepare_environment",
    "pull",
    "pull_files",
    "run",
    "start_run",
    "stop",
]


# --------------------------------------------------------------------------- with a cluster (CLI entry)


def resolve_cluster_name(name: str | None, *, project_dir: Path | None = None) -> str:
    """The cluster a command means (NAME, the project's ``cluster`` setting,
    or the only cluster): the provisioning layer's rule, used as is."""
    from gpuflow import clusters

    return clusters.resolve_cluster_name(name, project_dir=project_dir)


def is_known_cluster(name: str) -> bool:
    """Whether ``name`` is a live cluster in the local cache (no cloud call):
    tells ``run NAME -- CMD`` from ``run MODULE -- ARGS``."""
    from gpuflow import clusters

    try:
        clusters.get_cluster(validate_name(name, "cluster name"))
    except (NotFound, UsageError):
        return False
    return True


def run_on_cluster(
    cluster_name: str,
    *,
    project_dir: Path,
    module: str | None,
    args: Sequence[str],
    out: BinaryIO,
    up_spec: Any = None,
    down: bool = False,
    detach: bool = False,
    on_interrupt: Callable[[RunRecord], str] | None = None,
    say: Say = _quiet,
    resolve: TargetResolver = target_for_cluster,
    **run_options: Any,
) -> RunOutcome:
    """``gpuflow run [--up ...] [--down]``: optionally launch the cluster
    (``up_spec``, a ClusterSpec, when it does not exist yet), run, pull, and
    with ``down`` tear it down afterwards — also when the job fails, gpuflow
    fails or the user presses Ctrl-C (then the job is stopped, not detached:
    its instance is going away)."""
    if down and detach:
        raise UsageError("--down and --detach contradict each other", hint="drop one of them")
    if down:
        on_interrupt = _stop_on_interrupt
    in_process = up_spec is not None and getattr(up_spec, "sandbox", False) and down and not is_known_cluster(
        cluster_name
    )
    if in_process:
        # Launch, run and tear down in one process: the sandbox's EC2 API lives
        # in this process (moto) and vanishes with it — nothing is left behind.
        from infra.sandbox import in_process_sandbox

        sandbox_context: Any = in_process_sandbox((up_spec.region,))
    else:
        sandbox_context = contextlib.nullcontext()
    with sandbox_context:
        return _run_on_cluster(
            cluster_name,
            project_dir=project_dir,
            module=module,
            args=args,
            out=out,
            up_spec=up_spec,
            down=down,
            detach=detach,
            on_interrupt=on_interrupt,
            say=say,
            resolve=resolve,
            **run_options,
        )


def _run_on_cluster(
    cluster_name: str,
    *,
    up_spec: Any,
    down: bool,
    say: Say,
    resolve: TargetResolver,
    **run_arguments: Any,
) -> RunOutcome:
    from gpuflow import clusters

    primary: BaseException | None = None
    target: RunTarget | None = None
    try:
        if up_spec is not None:
            try:
                clusters.get_cluster(cluster_name)
                say(f"cluster {cluster_name} already exists: using it")
            except NotFound:
                say(f"launching cluster {cluster_name}")
                clusters.up(up_spec)
        target = resolve(cluster_name)
        return run(target, say=say, **run_arguments)
    except BaseException as exc:
        primary = exc
        raise
    finally:
        if down and not is_known_cluster(cluster_name):
            # Nothing of ours to tear down (an `up` refused the name, e.g. another owner's
            # cluster has it, or rolled back): never go looking for the name by its tags.
            say(f"no cluster {cluster_name} of this gpuflow to tear down")
        elif down:
            say(f"tearing down cluster {cluster_name}")
            # The cluster this run used, where it was made (not where the project's `sandbox` points).
            recorded_sandbox = target.cluster.sandbox if target is not None else getattr(up_spec, "sandbox", None)
            try:
                if target is not None:
                    _stop_live_jobs(target, say)
                clusters.down(cluster_name, sandbox=recorded_sandbox)
            except BaseException as teardown_error:
                if primary is None:
                    raise
                again = clusters.command_hint(f"down {cluster_name}", bool(recorded_sandbox))
                say(f"teardown of {cluster_name} failed too: {teardown_error} — run {again}")


def _stop_live_jobs(target: RunTarget, say: Say, grace_seconds: float = 5) -> None:
    """Before teardown: stop jobs still running on the head node (a sandbox
    "instance" is this machine, whose processes no termination would end).
    Best effort: teardown goes ahead whatever happens here."""
    try:
        runner = target.connect()
        try:
            for run_dir, report in run_status(runner, "--all", runner.base_dir).items():
                if report.get("job") == "alive" and report.get("exit_code") is None:
                    say(f"stopping the job still running in {run_dir}")
                    stop_job(runner, run_dir, grace_seconds=grace_seconds)
        finally:
            with contextlib.suppress(Exception):
                runner.close()
    except (GpuflowError, OSError, json.JSONDecodeError) as exc:
        say(f"could not check for running jobs before teardown: {exc}")


def _stop_on_interrupt(_record: RunRecord) -> str:
    return "stop"


def up_spec_for_run(name: str | None, *, project_dir: Path, **options: Any) -> Any:
    """The ClusterSpec `run --up` launches: options > project config > defaults
    (the provisioning layer's :func:`gpuflow.clusters.resolve_spec`)."""
    from gpuflow import clusters

    return clusters.resolve_spec(name, options, project_dir=project_dir)
