"""Fixtures for the sync tests: a project tree, and destinations of each kind.

The SSH destinations point at the loopback OpenSSH server (``sshd_session``);
since it runs on this machine as this user, the "remote" directory is also a
local path the tests can inspect directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuflow.records import SSHTarget
from gpuflow.sync import LocalDestination, SSHDestination
from tests.transport.conftest import target_for

# Names that break naive quoting: spaces, both quotes, unicode, leading dashes,
# a newline, a tab, a backslash, shell syntax and glob characters.
HOSTILE_NAMES = (
    "with space.txt",
    "quote'single.txt",
    'quote"double.txt',
    "ünïcødé-日本語.txt",
    "-leading-dash.txt",
    "--rf",
    "new\nline.txt",
    "tab\tname.txt",
    "back\\slash.txt",
    "$(touch PWNED).txt",
    "star*glob?[x].txt",
    "dir with space/-nested\nfile.txt",
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def make_target(server, known_hosts: Path) -> SSHTarget:
    """The server's target, its host key pinned in ``known_hosts``."""
    known_hosts.write_text(server.known_hosts_line() + "\n")
    return target_for(server, known_hosts)


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    write(root / "train.py", "print('train')\n")
    write(root / "pkg" / "model.py", "LAYERS = 3\n")
    write(root / "pkg" / "data.csv", "a,b\n1,2\n")
    for name in HOSTILE_NAMES:
        write(root / name, f"content of {name!r}\n")
    return root


@pytest.fixture(params=["copy", "rsync", "tar"])
def destination_kind(request) -> str:
    return request.param


@pytest.fixture
def make_destination(tmp_path, sshd_session):
    """``make_destination(kind, name)`` -> (destination, local path of its directory, method)."""

    def factory(kind: str, name: str = "remote/project"):
        directory = tmp_path / name
        if kind == "copy":
            return LocalDestination(directory), directory, "copy"
        target = make_target(sshd_session, tmp_path / "known_hosts")
        return SSHDestination(target, str(directory)), directory, kind

    return factory


def _hand_made_sandbox_instances_run(monkeypatch) -> None:
    """The sync tests hand-make sandbox cluster records whose instances no fake cloud
    holds, while reaching a sandbox node first asks the sandbox's cloud whether its
    instance runs (:func:`gpuflow.nodes.refuse_if_gone`): that cloud answers
    "running" here, so the tests stay about sync and start no sandbox server."""
    from gpuflow import nodes

    monkeypatch.setattr(nodes.ProvisionerProbe, "instance_state", lambda self, cluster, instance_id: "running")


@pytest.fixture(autouse=True)
def _sandbox_instances_run(monkeypatch):
    _hand_made_sandbox_instances_run(monkeypatch)
