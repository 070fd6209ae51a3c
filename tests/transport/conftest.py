"""Fixtures for the transport tests: targets for the loopback sshd with pinned keys."""

from __future__ import annotations

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
