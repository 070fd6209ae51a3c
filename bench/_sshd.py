"""The loopback OpenSSH server the benchmarks share (tests/sshd.py's throwaway server).

``start_sshd(work)`` starts one under ``work/sshd`` (its own host key, client key and free
port on 127.0.0.1; ``log_level="INFO"`` logs each login, for counting connections);
``pinned_target(server, work)`` is an :class:`~gpuflow.records.SSHTarget` for it with its
host key pinned in ``work/known_hosts``, as gpuflow reaches an instance.  Stop the server
with ``server.stop()``.  Run the benchmarks in a loopback-only network namespace.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from gpuflow.records import SSHTarget  # noqa: E402
from tests.sshd import SshServer  # noqa: E402


def start_sshd(work: Path, *, extra_config: tuple[str, ...] = (), log_level: str = "ERROR") -> SshServer:
    return SshServer(work / "sshd", extra_config=extra_config, log_level=log_level).start()


def pinned_target(server: SshServer, work: Path) -> SSHTarget:
    known_hosts = work / "known_hosts"
    known_hosts.write_text(server.known_hosts_line() + "\n")
    return SSHTarget("127.0.0.1", server.port, server.user, str(server.client_key), str(known_hosts))
