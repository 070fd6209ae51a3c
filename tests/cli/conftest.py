"""The CLI in this process: `cli(argv)` is `gpuflow ARGV` (the one error-mapping path), against
sandbox clusters whose EC2 API is moto in this process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpuflow import clusters


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project with a module (pkg/train.py), a runnable package (tool/__main__.py) and job.py."""
    directory = tmp_path / "project"
    (directory / "pkg").mkdir(parents=True)
    (directory / "pkg" / "__init__.py").write_text("")
    (directory / "pkg" / "train.py").write_text("print('train')\n")
    (directory / "tool").mkdir()
    (directory / "tool" / "__main__.py").write_text("print('tool')\n")
    (directory / "job.py").write_text("print('job')\n")
    monkeypatch.chdir(directory)
    return directory


@contextlib.contextmanager
def sandbox_clusters(project: Path, *names: str) -> Iterator[None]:
    """Sandbox clusters ``names``, up for the block and down after it (whatever is left of them)."""
    from infra.sandbox import in_process_sandbox

    with in_process_sandbox():
        try:
            for name in names:
                clusters.up(clusters.resolve_spec(name, {"sandbox": True}, project_dir=project))
            yield
        finally:
            for name in names:
                with contextlib.suppress(Exception):
                    clusters.down(name, sandbox=True)


class RunSpy:
    """Stands in for gpuflow.jobs.run_on_cluster: records what the CLI asked to run, runs nothing
    (``detached``: answers as a run that Ctrl-C detached from)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.detached = False

    def __call__(self, cluster_name: str, **kwargs) -> object:
        self.calls.append({"cluster": cluster_name, **kwargs})
        record = SimpleNamespace(run_id="20261130-000000-spy0", local_dir="runs/20261130-000000-spy0")
        return SimpleNamespace(detached=self.detached, record=record)

    def only(self) -> dict:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


@pytest.fixture
def run_spy(monkeypatch) -> RunSpy:
    from gpuflow import jobs

    spy = RunSpy()
    monkeypatch.setattr(jobs, "run_on_cluster", spy)  # the CLI calls jobs.run_on_cluster
    return spy
