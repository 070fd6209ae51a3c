"""The ``gpuflow_sandbox`` fixture's object: one test's gpuflow home and in-process sandbox cloud.

Everything goes through gpuflow's own use cases — ``up`` is
:func:`gpuflow.clusters.up`, ``run`` is :func:`gpuflow.jobs.run` (sync the
project to the sandbox instance, start the job detached, follow its log, pull
its files), ``down`` is :func:`gpuflow.clusters.down` — against moto in this
process (:func:`infra.sandbox.in_process_sandbox`), with ``GPUFLOW_HOME`` a
directory of the test's own.  So two tests never see each other's clusters,
and neither sees the user's real gpuflow home or AWS account: the
environment the block runs in has fake AWS credentials, no AWS profile or
config file, no ``GPUFLOW_OWNER_ID`` and no loopback-sshd setting.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from gpuflow import clusters, jobs
from gpuflow.procs import identity
from gpuflow.provisioner import in_process_cloud
from gpuflow.clusters.interrupt import interrupt_node
from gpuflow.clusters.spec import default_region
from gpuflow.config import ENV_HOME, find_project_root, read_project_config
from gpuflow.errors import GpuflowError, JobFailed, JobInterrupted, NotFound, UsageError
from gpuflow.records import Cluster
from gpuflow.testing.leaks import (
    LeakKind,
    Leftover,
    cloud_leftovers,
    leak_message,
    local_leftovers,
    remove_cloud_leftovers,
    remove_local_leftovers,
)

# Variables that would point the test's gpuflow or boto3 somewhere real: removed for the block.
_REMOVED_VARIABLES = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "GPUFLOW_OWNER_ID", "GPUFLOW_SANDBOX_SSH",
    "GPUFLOW_IMDS_ENDPOINT",  # the sandbox nodes' own metadata services answer (interrupt())
)
_FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    # moto's thousands of stock AMIs cost seconds at every start and reset of its EC2; the
    # sandbox seeds the Deep Learning AMI gpuflow resolves (infra.sandbox.seed).
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
}


@dataclass(frozen=True)
class SandboxRun:
    """One finished run, its files pulled into ``local_dir`` (the test's own directory)."""

    exit_code: int | None  # None: started with detach=True, still running
    run_id: str
    cluster: str
    local_dir: Path  # job.log, manifest.json, outputs/
    log: str  # what the job printed (stdout and stderr, as `gpuflow run` streams it)
    metrics: dict[str, Any] | None  # outputs/metrics.json, parsed; None when the job wrote none
    manifest: dict[str, Any]  # manifest.json: command, git state, cluster, AMI, timings
    interruption: str | None = None  # the spot notice its node's watcher saw and acted on, in words

    @property
    def outputs(self) -> Path:
        """``$GPUFLOW_OUTPUT_DIR`` of the job, pulled: ``local_dir / "outputs"``."""
        return self.local_dir / jobs.OUTPUTS_NAME

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class GpuflowSandbox:
    """What the ``gpuflow_sandbox`` fixture gives a test.

    ``home`` is the test's gpuflow home, ``project_dir`` the project that
    ``run`` syncs and runs, ``region`` the default region (the project's
    ``region`` setting, else us-east-1).
    """

    def __init__(self, *, home: Path, project_dir: Path, runs_dir: Path, region: str) -> None:
        self.home = home
        self.project_dir = project_dir
        self.region = region
        self._runs_dir = runs_dir
        self._regions: set[str] = {region}
        self._clients: dict[tuple[str, str], Any] = {}

    # ------------------------------------------------------------------ clusters
    def up(
        self,
        name: str | None = None,
        *,
        count: int | None = None,
        spot: bool | None = None,
        instance_type: str | None = None,
        region: str | None = None,
        **options: Any,
    ) -> Cluster:
        """``gpuflow up --sandbox``: options (``count``, ``spot``, ``spot_fallback``,
        ``instance_type``, ``region``, ``max_hours``, ... — the ClusterSpec fields) over the
        project's gpuflow.toml over the defaults.  Returns the cluster record."""
        if options.get("sandbox") is False:
            raise UsageError("gpuflow_sandbox only brings up sandbox clusters")
        given = {"count": count, "spot": spot, "instance_type": instance_type, "region": region, **options}
        given["sandbox"] = True
        spec = clusters.resolve_spec(name, given, project_dir=self.project_dir)
        self._regions.add(spec.region)
        return clusters.up(spec)

    @property
    def entry(self) -> str | None:
        """The project's training entry point: the ``entry`` setting of its gpuflow.toml
        (written by ``gpuflow init``), None when not set."""
        value = read_project_config(self.project_dir).jobs.entry
        return str(value) if value else None

    def clusters(self) -> list[str]:
        """The names of this test's live clusters."""
        return sorted(cluster.name for cluster in clusters.known_clusters())

    def down(self, name: str | None = None) -> Any:
        """``gpuflow down NAME --yes``: stop its jobs, terminate, delete its security
        group and key pair.  ``name`` may be left out when one cluster is up."""
        return clusters.down(self._cluster_name(name), sandbox=True)

    def interrupt(
        self,
        cluster: str | None = None,
        node: str | None = None,
        notice_seconds: float = 2.0,
        *,
        wait: bool = False,
        timeout: float = 60.0,
    ) -> Any:
        """``gpuflow sandbox interrupt``: the node (default: the head node of the only
        cluster) gets a spot interruption notice from its metadata service now (once the
        spot watchers of its running jobs are watching, at most 30 s), and is
        terminated (state reason ``Server.SpotInstanceTermination``, its processes killed,
        its directory gone) ``notice_seconds`` later.  Returns the
        :class:`~gpuflow.clusters.interrupt.Interruption` at once, or with ``wait`` once the
        instance is terminated (at most ``timeout`` seconds)."""
        done = interrupt_node(self._cluster_name(cluster), node, notice_seconds=notice_seconds)
        if wait:
            self.wait_terminated(done.instance_id, timeout=timeout)
        return done

    def wait_terminated(self, instance_id: str, *, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the fake cloud reports ``instance_id`` terminated; its description."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            for region in sorted(self._cloud_regions()):
                with contextlib.suppress(Exception):
                    for reservation in self.client(region=region).describe_instances(
                        InstanceIds=[instance_id]
                    )["Reservations"]:
                        for instance in reservation["Instances"]:
                            if instance["State"]["Name"] == "terminated":
                                return instance
            if time.monotonic() >= deadline:
                raise AssertionError(f"{instance_id} was not terminated within {timeout:g} s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ runs
    def run(
        self,
        target: str | Sequence[str] | None,
        *args: str,
        cluster: str | None = None,
        env: Mapping[str, str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        detach: bool = False,
        recover: bool | None = None,
        max_restarts: int | None = None,
        fallback_types: str | None = None,
        restart_on_exit_codes: str | None = None,
        max_dollars: float | None = None,
    ) -> SandboxRun:
        """``gpuflow run``: sync the project to the cluster's sandbox instance, run
        ``target`` there, stream its log, pull its files.

        ``target`` is a module (``"train"``, ``"mypkg.train"``, run as ``python -m``),
        a script (``"train.py"``, run with python), a command line (``"python train.py
        --epochs 1"``, split like a shell would) or a command as a list; ``args`` follow
        it.  ``env`` adds variables to the job's environment (e.g. ``{"GPUFLOW_SMOKE": "1"}``).
        A job that fails is not an error here: look at ``exit_code`` (and ``log``).
        ``detach`` returns once the job has started (``exit_code`` None, nothing pulled).
        ``recover`` and the options after it are ``gpuflow run --recover``'s (default: the
        project's gpuflow.toml, as for ``gpuflow run``): an interrupted run (``interrupt()``)
        continues on a relaunched node, its attempts in ``manifest["attempts"]``.
        """
        recovery = jobs.recovery_policy(
            read_project_config(self.project_dir).recovery, recover=recover, max_restarts=max_restarts,
            fallback_types=fallback_types, restart_on_exit_codes=restart_on_exit_codes, max_dollars=max_dollars,
        )
        if target is None:
            raise UsageError("nothing to run (no entry point)",
                             hint="set entry = \"train.py\" in gpuflow.toml (gpuflow init --entry) or pass what to run")
        module, command = _module_or_command(target, args)
        name = self._cluster_name(cluster)
        out = io.BytesIO()
        options: dict[str, Any] = {
            "project_dir": self.project_dir, "module": module, "args": command, "out": out, "env": dict(env or {}),
            "data_dir": Path(data_dir) if data_dir is not None else None, "poll_interval": 0.1, "say": _say,
            "detach": detach,
        }
        try:
            if recovery is not None:  # `gpuflow run --recover`: relaunches through the cluster's own path
                outcome = jobs.run_on_cluster(name, recovery=recovery, **options)
            else:
                outcome = jobs.run(jobs.target_for_cluster(name), **options)
            record = outcome.record
            if outcome.detached:
                return SandboxRun(exit_code=None, run_id=record.run_id, cluster=name, local_dir=Path(record.local_dir),
                                  log="", metrics=None, manifest={})
            exit_code = int(outcome.exit_code if outcome.exit_code is not None else -1)
        except JobFailed as failed:
            exit_code = int(failed.exit_code)
            record = _newest_record(name)
        except JobInterrupted:  # it saved a checkpoint and exited 75 (a spot notice, `stop`): its files were pulled
            exit_code = 75
            record = _newest_record(name)
        except GpuflowError:
            # A lost run, a failed pull, ...: raised as is, but what was pulled still leaves the project.
            with contextlib.suppress(Exception):
                newest = _newest_record(name)
                if Path(newest.local_dir).is_dir():
                    self._claim(Path(newest.local_dir))
            raise
        log = out.getvalue().decode(errors="replace")
        sys.stdout.write(log)  # pytest shows it with a failing test
        local_dir = self._claim(Path(record.local_dir))
        return SandboxRun(
            exit_code=exit_code,
            run_id=record.run_id,
            cluster=name,
            local_dir=local_dir,
            log=log,
            metrics=_read_json(local_dir / jobs.OUTPUTS_NAME / "metrics.json"),
            manifest=_read_json(local_dir / jobs.MANIFEST_NAME) or {},
            interruption=getattr(record, "interruption", None),
        )

    # ------------------------------------------------------------------ assertions
    def client(self, service: str = "ec2", region: str | None = None) -> Any:
        """A boto3 client bound to this test's fake cloud (``region`` default: the sandbox's)."""
        import boto3

        region = region or self.region
        self._regions.add(region)
        if (service, region) not in self._clients:
            session = boto3.session.Session(botocore_session=_botocore_session())
            self._clients[(service, region)] = session.client(
                service, region_name=region, aws_access_key_id="testing", aws_secret_access_key="testing",
                aws_session_token="testing",
            )
        return self._clients[(service, region)]

    def leftovers(self) -> list[Leftover]:
        """What would fail the test if it ended now: every live resource of the fake
        cloud and every sandbox directory, job process and sandbox server of the home."""
        from infra.sandbox import read_server_record

        def server_alive(home: Path) -> int | None:
            record = read_server_record(home)
            return record.pid if record is not None and _alive(record.pid) else None

        return cloud_leftovers(self._client_for, self._cloud_regions()) + local_leftovers(
            self.home, server_alive=server_alive
        )

    # ------------------------------------------------------------------ internals
    def _client_for(self, service: str, region: str) -> Any:
        return self.client(service, region)

    def _cloud_regions(self) -> set[str]:
        """Every region this test's fake cloud holds anything in (moto's own record of
        the regions it built), plus those this object used."""
        regions = set(self._regions)
        with contextlib.suppress(Exception):  # moto's layout changed: the regions used here still count
            from moto.backends import get_backend
            from moto.core import DEFAULT_ACCOUNT_ID

            regions.update(get_backend("ec2")[DEFAULT_ACCOUNT_ID].keys())
        return regions

    def _cluster_name(self, name: str | None) -> str:
        if name is not None:
            return name
        names = self.clusters()
        if len(names) == 1:
            return names[0]
        if not names:
            raise UsageError("no cluster is up in this gpuflow_sandbox", hint="call gpuflow_sandbox.up() first")
        raise UsageError(f"{len(names)} clusters are up ({', '.join(names)})", hint="name the one you mean")

    def _claim(self, pulled: Path) -> Path:
        """Move a run's pulled directory out of the project (``<project>/runs/<id>``)
        into the test's own directory: a test leaves no files in the project."""
        destination = self._runs_dir / pulled.name
        if not pulled.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            return destination
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(pulled), str(destination))
        with contextlib.suppress(OSError):
            pulled.parent.rmdir()  # <project>/runs, when this run made it and nothing else is in it
        return destination

    def _finish(self, *, test_id: str) -> str | None:
        """The teardown check: find what is left, remove it; the failure message, or None."""
        found = self.leftovers()
        if not found:
            return None
        failures: list[str] = []
        # gpuflow's own teardown first (jobs stopped, instances terminated, groups and keys deleted) ...
        for name in self.clusters():
            try:
                clusters.down(name, sandbox=True)
            except GpuflowError as exc:
                failures.append(f"gpuflow down {name}: {exc.one_line()}")
        # ... then whatever is still there, by hand.
        from infra.sandbox import stop_sandbox

        failures += remove_cloud_leftovers(self._client_for, cloud_leftovers(self._client_for, self._cloud_regions()))
        failures += remove_local_leftovers(self.home, stop_server=stop_sandbox)
        return leak_message(found, failures, test_id=test_id)


_BOTOCORE_SESSIONS: list[Any] = []


def _botocore_session() -> Any:
    """One botocore session for every test's clients: it loads each service's model once
    (a second per new session otherwise).  Made inside the first sandbox, after moto's import,
    so moto's request interception is among its handlers."""
    if not _BOTOCORE_SESSIONS:
        import botocore.session

        _BOTOCORE_SESSIONS.append(botocore.session.get_session())
    return _BOTOCORE_SESSIONS[0]


def _module_or_command(target: str | Sequence[str], args: Sequence[str]) -> tuple[str | None, list[str]]:
    if isinstance(target, (list, tuple)):
        command = [str(word) for word in (*target, *args)]
        if not command:
            raise UsageError("nothing to run", hint="give a module, a script or a command")
        return None, command
    if not isinstance(target, str) or not target:
        raise UsageError(f"nothing to run: {target!r}", hint="give a module, a script or a command")
    if any(character.isspace() for character in target):
        return None, [*shlex.split(target), *map(str, args)]
    if target.endswith(".py"):
        return None, ["python", target, *map(str, args)]
    return target, [str(word) for word in args]


def _newest_record(cluster: str) -> Any:
    records = [record for record in jobs.all_records() if record.cluster == cluster]
    if not records:
        raise UsageError(f"no run was recorded on {cluster}")
    return max(records, key=lambda record: (record.started_at or "", record.run_id))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _alive(pid: int) -> bool:
    return identity(pid) is not None


def project_root(start: Path) -> Path:
    """The project a test in ``start`` means: the nearest directory at or above it
    holding gpuflow.toml, pyproject.toml or .git."""
    return find_project_root(start)


def _say(message: str) -> None:
    print(f"gpuflow: {message}", file=sys.stderr)


def _environment(home: Path, region: str) -> dict[str, str]:
    kept = {key: value for key, value in os.environ.items() if key not in _REMOVED_VARIABLES}
    return {
        **kept,
        **_FAKE_CREDENTIALS,
        ENV_HOME: str(home),
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


class LeftBehind(Exception):
    """The test left something in its sandbox (the message names each thing)."""


@contextlib.contextmanager
def open_sandbox(*, home: Path, project_dir: Path, test_id: str, keep: bool = False) -> Iterator[GpuflowSandbox]:
    """A :class:`GpuflowSandbox` for the block; at its end, raises :class:`LeftBehind`
    naming whatever the block left (after removing it).  The home is deleted
    afterwards unless ``keep``."""
    home = Path(home).resolve()
    project_dir = Path(project_dir).resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    runs_dir = home.parent / f"{home.name}-runs"
    message = None
    with mock.patch.dict(os.environ, _environment(home, default_region({})), clear=True):
        configured = read_project_config(project_dir).cluster.region
        region = str(configured) if configured else default_region()
        os.environ["AWS_DEFAULT_REGION"] = os.environ["AWS_REGION"] = region
        with in_process_cloud((region,), home=home):
            sandbox = GpuflowSandbox(home=home, project_dir=project_dir, runs_dir=runs_dir, region=region)
            try:
                yield sandbox
            finally:
                message = sandbox._finish(test_id=test_id)
    if not keep:
        shutil.rmtree(home, ignore_errors=True)
    if message is not None:
        raise LeftBehind(message)


__all__ = ["GpuflowSandbox", "LeakKind", "LeftBehind", "Leftover", "SandboxRun", "open_sandbox"]
