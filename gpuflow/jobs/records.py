"""A run's records: its typed status, its local record (the ``runs`` state collection), targets and outcomes."""

from __future__ import annotations

import datetime
import enum
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gpuflow.durable.ref import DurableRef
from gpuflow.config import gpuflow_home
from gpuflow.errors import RunLost, RunNotFound
from gpuflow.records import Cluster, check_shape
from gpuflow.state import StateStore, validate_name
from gpuflow.transport.base import CommandRunner

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
# A job that saved a checkpoint and stopped when asked (SIGTERM, SIGUSR1: a spot notice,
# `gpuflow stop`) exits with this code: "interrupted, resumable" (EX_TEMPFAIL), not a failure.
INTERRUPTED_EXIT_CODE = 75
# A worker of a multi-node run whose collective broke because a peer died or hung exits with this
# code (EX_SOFTWARE; training.distributed's WorkerLost): a consequence of another node's failure,
# which is the one a run's status names (jobs.workers.derive_status).
PEER_LOST_EXIT_CODE = 70
# Where a training module keeps its resumable checkpoint's description, under the run's outputs.
CHECKPOINT_STATE = "outputs/checkpoint/state.json"
INTERRUPTION_NAME = "interruption.json"  # written by the supervisor's spot-interruption watcher
REBALANCE_NAME = "rebalance.json"
# `gpuflow stop`: seconds between SIGTERM and SIGKILL.  The two minutes EC2 gives a spot
# instance between its notice and the end: a job that saves in time for a spot notice
# saves in time for `stop` (which returns as soon as the job has ended).
STOP_GRACE_SECONDS = 120.0

Say = Callable[[str], None]


def quiet(_message: str) -> None:
    """Default for ``say``: library code prints nothing unless asked."""


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def new_run_id(now: datetime.datetime | None = None) -> str:
    """Sortable and unique enough: ``20261128-031500-1a2b`` (UTC time + 4 hex)."""
    moment = (now or utc_now()).astimezone(datetime.timezone.utc)
    return f"{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# --------------------------------------------------------------------------- typed state


class RunState(str, enum.Enum):
    """What is known of a run's job (the ``status`` of its record; the last one only in a listing)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # it saved a checkpoint and exited 75: `gpuflow run --resume` continues it
    LOST = "lost"  # no exit code and no live job, or its cluster is gone
    UNREACHABLE = "unreachable"  # its cluster cannot be reached right now: never recorded

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Checkpoint:
    """Where a job's resumable checkpoint stands: ``<output>/checkpoint/state.json``
    (``{"format": 1, "epoch": E, "step": S, "complete": true}``, written by the training modules)."""

    epoch: int
    step: int

    @classmethod
    def parse(cls, document: Any) -> Checkpoint | None:
        """The checkpoint a state.json document describes; None unless it is complete and of format 1."""
        if not isinstance(document, dict) or document.get("format") != 1 or document.get("complete") is not True:
            return None
        epoch, step = document.get("epoch"), document.get("step")
        if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in (epoch, step)):
            return None
        return cls(epoch, step)

    def __str__(self) -> str:
        return f"epoch {self.epoch} step {self.step}"


@dataclass(frozen=True)
class RunStatus:
    """A run's state with its job's exit code; ``str()`` is what ``gpuflow runs`` prints
    (``running``, ``succeeded``, ``failed(N)``, ``interrupted (resumable at epoch E step S)``,
    ``lost``, ``unreachable``; a running job's ``note``, e.g. a rebalance recommendation, in parentheses)."""

    state: RunState
    exit_code: int | None = None
    checkpoint: Checkpoint | None = None  # an interrupted run's: where it resumes
    note: str | None = field(default=None, compare=False)  # shown, never recorded as the state

    @classmethod
    def of_exit_code(cls, exit_code: int | None, checkpoint: Checkpoint | None = None) -> RunStatus:
        """The status an exit code proves: none yet is ``running``, 0 ``succeeded``,
        75 ``interrupted`` (resumable, at ``checkpoint`` when it is known), else ``failed``."""
        if exit_code is None:
            return cls(RunState.RUNNING)
        if exit_code == INTERRUPTED_EXIT_CODE:
            return cls(RunState.INTERRUPTED, exit_code, checkpoint)
        return cls(RunState.SUCCEEDED if exit_code == 0 else RunState.FAILED, exit_code)

    @property
    def finished(self) -> bool:
        """The job has ended with an exit code (interrupted included: nothing of it runs)."""
        return self.state in (RunState.SUCCEEDED, RunState.FAILED, RunState.INTERRUPTED)

    def __str__(self) -> str:
        if self.state is RunState.FAILED:  # a multi-node run's note: which node failed, and why
            return f"failed({self.exit_code})" + (f" ({self.note})" if self.note else "")
        if self.state is RunState.INTERRUPTED:
            return f"interrupted (resumable at {self.checkpoint})" if self.checkpoint else "interrupted (resumable)"
        if self.note:
            return f"{self.state.value} ({self.note})"
        return self.state.value


class InterruptChoice(str, enum.Enum):
    """What Ctrl-C (or SIGTERM) during ``gpuflow run`` does to the job."""

    DETACH = "detach"  # leave it running; follow it later with `gpuflow logs RUN -f`
    STOP = "stop"  # stop it, pull what it left, fail


class ProcessLiveness(str, enum.Enum):
    """What :func:`gpuflow.procs.status` proved of a run's job or its supervisor."""

    ALIVE = "alive"  # its recorded process is proven to be it
    GONE = "gone"  # it was recorded, and no process proven to be it is left
    NONE = "none"  # never recorded (the job: never started)


class StopOutcome(str, enum.Enum):
    """What ``gpuflow stop`` did to a run's job."""

    FINISHED = "finished"  # it had already ended
    TERMINATED = "terminated"  # it ended on SIGTERM
    KILLED = "killed"  # it needed SIGKILL after the grace period
    GONE = "gone"  # no process proven to be the job was left to signal

    def __str__(self) -> str:
        return self.value


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
    # Every node of the cluster, the head first, as a multi-node run reaches them; () when
    # only the head is reachable (then a run is on one node).
    nodes: tuple[NodeTarget, ...] = ()


@dataclass(frozen=True)
class NodeTarget:
    """One node of a cluster as a run reaches it: its address (``host``, the private one
    on AWS) for the other workers, a new runner per call, and the syncs to it."""

    instance_id: str
    host: str
    connect: Callable[[], CommandRunner]
    sync_project: Callable[[Path], object] | None = None
    sync_data: Callable[[Path], object] | None = None
    sandbox: bool = False  # a sandbox node: on this machine (127.0.0.1, a free port per worker)


@dataclass(frozen=True)
class PulledFile:
    """One file of the run's local copy: its path under ``runs/<run-id>/``, the sha256 of the
    instance's file it was pulled from, and the sha256 it has here (the same, except for the
    manifest, which gpuflow completes after pulling it)."""

    path: str
    remote_sha256: str
    local_sha256: str


@dataclass(frozen=True)
class PulledCopy:
    """What the last pull left in the run's local directory: every file it copied or found
    unchanged, and whether that is all the run has (pulled after its job ended, no file
    skipped or refused) — what lets ``logs`` and ``pull`` serve it once the cluster is gone,
    and a repeated pull tell an unchanged file from a changed one."""

    files: tuple[PulledFile, ...] = ()
    complete: bool = False

    def file(self, path: str) -> PulledFile | None:
        return next((pulled for pulled in self.files if pulled.path == path), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PulledCopy:
        return cls(files=tuple(PulledFile(**item) for item in data.get("files", ())),
                   complete=bool(data.get("complete", False)))

    def to_dict(self) -> dict[str, Any]:
        return {"files": [asdict(pulled) for pulled in self.files], "complete": self.complete}


@dataclass(frozen=True)
class WorkerNode:
    """One node of a multi-node run (:mod:`gpuflow.jobs.workers`): its place in TF_CONFIG
    (``index``, 0 the chief; ``host:port``), its supervisor's peer watch port, its run directory."""

    index: int
    instance_id: str
    host: str
    port: int
    watch_port: int
    remote_dir: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


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
    status: RunState = RunState.RUNNING  # stored as its value: running | succeeded | failed | lost
    exit_code: int | None = None
    ended_at: str | None = None
    module: str | None = None
    # The job's outcome beyond its exit code, recorded before its files are pulled
    # (instance clock; Python version from the supervisor's probe).
    job_started_at: str | None = None
    python: str | None = None
    duration_seconds: float | None = None
    lost_reason: str | None = None  # why the run is 'lost'
    checkpoint: Checkpoint | None = None  # an interrupted run's resumable checkpoint
    interruption: str | None = None  # the spot interruption notice its job was stopped for, in words
    resumes: tuple[Resume, ...] = ()  # each `gpuflow run --resume`, oldest first
    pulled: PulledCopy | None = None  # what the last pull left in local_dir (None: never pulled)
    # `run --recover` / `resume --on|--up`: every attempt (instance, cost, why it ended), oldest first,
    # and what starts the job again on another cluster (its arguments, --env and --data as given).
    attempts: tuple[Attempt, ...] = ()
    args: tuple[str, ...] | None = None
    job_env: dict[str, str] | None = None
    data_dir: str | None = None
    durable: DurableRef | None = None  # where its checkpoints, log and outputs are kept in S3 (None: nowhere)
    durable_problem: str | None = None  # what of it was never uploaded there, in one line (None: nothing)
    workers: tuple[WorkerNode, ...] = ()  # a multi-node run's nodes, the chief (remote_dir) first; () on one node
    failure: str | None = None  # a failed multi-node run: which node failed, and why

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", RunState(self.status))
        if isinstance(self.durable, dict):  # as stored
            object.__setattr__(self, "durable", DurableRef.from_dict(self.durable))
        object.__setattr__(self, "workers", tuple(
            WorkerNode(**worker) if isinstance(worker, dict) else worker for worker in self.workers
        ))
        if isinstance(self.pulled, dict):  # as stored
            object.__setattr__(self, "pulled", PulledCopy.from_dict(self.pulled))

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["command"] = list(self.command)
        data["status"] = self.status.value
        data["checkpoint"] = asdict(self.checkpoint) if self.checkpoint is not None else None
        data["resumes"] = [resume.to_dict() for resume in self.resumes]
        data["attempts"] = [attempt.to_dict() for attempt in self.attempts]
        data["args"] = list(self.args) if self.args is not None else None
        data["pulled"] = self.pulled.to_dict() if self.pulled is not None else None
        data["durable"] = self.durable.to_dict() if self.durable is not None else None
        data["workers"] = [asdict(worker) for worker in self.workers]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = set(cls.__dataclass_fields__)
        values = {key: value for key, value in data.items() if key in known}
        values["command"] = tuple(values.get("command", ()))
        values["checkpoint"] = Checkpoint(**values["checkpoint"]) if values.get("checkpoint") else None
        values["resumes"] = tuple(Resume.from_dict(resume) for resume in values.get("resumes") or ())
        values["attempts"] = tuple(Attempt.from_dict(attempt) for attempt in values.get("attempts") or ())
        values["args"] = tuple(values["args"]) if values.get("args") is not None else None
        return cls(**values)

    @property
    def run_status(self) -> RunStatus:
        return RunStatus(self.status, self.exit_code, self.checkpoint if self.status is RunState.INTERRUPTED else None,
                         note=self.failure if self.status is RunState.FAILED else None)

    @property
    def finished(self) -> bool:
        return self.run_status.finished

    def status_text(self) -> str:
        return str(self.run_status)

    def with_status(self, status: RunStatus, **changes: Any) -> RunRecord:
        """This record with ``status`` (state, exit code, checkpoint) and other ``changes``."""
        return replace(self, status=status.state, exit_code=status.exit_code, checkpoint=status.checkpoint, **changes)


@dataclass(frozen=True)
class Resume:
    """One ``gpuflow run --resume``: when, and how the attempt before it had ended
    (its files — exit code, pids, notices — moved to ``attempts/<attempt>/`` in the run directory)."""

    at: str  # this machine's clock
    attempt: int
    previous_status: str  # e.g. "interrupted (resumable at epoch 1 step 7)"
    previous_exit_code: int | None = None
    checkpoint: Checkpoint | None = None  # where the resumed job continues
    previous_duration_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint"] = asdict(self.checkpoint) if self.checkpoint is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Resume:
        values = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        values["checkpoint"] = Checkpoint(**values["checkpoint"]) if values.get("checkpoint") else None
        return cls(**values)


class AttemptEnd(str, enum.Enum):
    """Why one attempt of a run ended (``run --recover``)."""

    RUNNING = "running"  # not ended yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the job's own exit code
    INTERRUPTED = "interrupted"  # it saved a checkpoint and exited 75 (a spot notice)
    INSTANCE_GONE = "instance-gone"  # its instance was terminated under it
    LOST = "lost"  # its job vanished on a live instance
    BUDGET = "budget"  # stopped by gpuflow before the run's cost would pass --max-dollars
    STOPPED = "stopped"  # stopped by Ctrl-C or `gpuflow stop`
    GPUFLOW = "gpuflow-failed"  # gpuflow itself failed (or was interrupted) around it

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Attempt:
    """One attempt of a run on one instance: where it ran, when, how it ended and what it cost
    (price per hour x its wall time on this machine's clock; the spot price when it was spot)."""

    number: int
    instance_id: str | None
    instance_type: str
    availability_zone: str | None
    market: str  # "spot" | "on-demand"
    price_per_hour: float | None
    started_at: str
    ended_at: str | None = None
    ended: AttemptEnd = AttemptEnd.RUNNING
    exit_code: int | None = None
    cost_usd: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ended", AttemptEnd(self.ended))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ended"] = self.ended.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PullReport:
    local_dir: Path
    fetched: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    changing: tuple[str, ...] = ()  # files rewritten by the job while being pulled (skipped)
    bytes_fetched: int = 0
    refused: tuple[str, ...] = ()  # entries that are symlinks, special files or would escape local_dir


@dataclass(frozen=True)
class RunOutcome:
    record: RunRecord
    exit_code: int | None  # None when detached
    detached: bool = False
    pull: PullReport | None = None
    stopped: bool = False


@dataclass(frozen=True)
class ListedRun:
    """One row of ``gpuflow runs``: the record and its status as just checked."""

    record: RunRecord
    status: RunStatus

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "status": str(self.status)}


def _store(home: Path | None) -> StateStore:
    return StateStore(home or gpuflow_home(), RUNS_COLLECTION, shape=_check_run_record, repair_hint=_damaged_run_hint)


def _check_run_record(run_id: str, document: dict[str, Any]) -> None:
    """A run record parses into a RunRecord, stored under its own run id."""
    # ``status`` is an enum's value: checked here, the other fields by their annotated types.
    check_shape(RunRecord, {key: value for key, value in document.items() if key != "status"})
    if "status" in document and document["status"] not in {state.value for state in RunState}:
        raise ValueError(f"its status {document['status']!r} is none of {', '.join(state.value for state in RunState)}")
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



def lose(record: RunRecord, reason: str, home: Path | None) -> RunLost:
    """Record the run as lost (and why); the error that says so."""
    save_record(replace(record, status=RunState.LOST, lost_reason=reason), home)
    return RunLost(
        f"run {record.run_id} is lost: {reason}",
        hint=f"its outcome is unknown; what was pulled is in {record.local_dir}",
    )
