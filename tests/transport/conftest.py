"""Fixtures for the transport tests: targets for the loopback sshd with pinned keys."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from gpuflow.records import SSHTarget


def target_for(server, known_hosts: Path, *, trust_on_first_use: bool = False) -> SSHTarget:
    return SSHTarget(
        host="127.0.0.1",
        port=server.port,
        user=server.user,
        key_path=str(server.client_key),
        known_hosts_path=str(known_hosts),
        trust_on_first_use=trust_on_first_use,
    )


@pytest.fixture
def pinned_known_hosts(tmp_path, sshd_session) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(sshd_session.known_hosts_line() + "\n")
    return path


@pytest.fixture
def fake_cloud(monkeypatch):
    """Stand-in answers for gpuflow.clusters.console_output / instance_state
    (what EC2 would say), patched into the real module when it exists."""
    answers = types.SimpleNamespace(console="", state="running", state_calls=0, console_calls=0)

    def console_output(cluster, instance_id):
        answers.console_calls += 1
        return answers.console

    def instance_state(cluster, instance_id):
        answers.state_calls += 1
        return answers.state

    try:
        import gpuflow.clusters as clusters
    except ImportError:
        clusters = types.ModuleType("gpuflow.clusters")
        monkeypatch.setitem(sys.modules, "gpuflow.clusters", clusters)
        import gpuflow

        monkeypatch.setattr(gpuflow, "clusters", clusters, raising=False)
    monkeypatch.setattr(clusters, "console_output", console_output, raising=False)
    monkeypatch.setattr(clusters, "instance_state", instance_state, raising=False)
    return answers
