"""A real, throwaway OpenSSH server on 127.0.0.1 for the tests.

Each server has its own ed25519 host key, its own client key in its own
authorized_keys and a free port; nothing outside loopback is involved.  It
runs as the current user (root in CI) with key authentication only.

Usage (see the ``sshd`` fixtures in ``tests/conftest.py``)::

    server = SshServer(tmp_path); server.start()
    server.port, server.client_key, server.host_public_key
    server.drop_sessions()   # end every live session, keep the listener
    server.stop()
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def sshd_available() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


class SshServer:
    def __init__(self, directory: Path, extra_config: tuple[str, ...] = (), log_level: str = "ERROR") -> None:
        self.extra_config = tuple(extra_config)  # more sshd_config lines (e.g. SetEnv for the sessions)
        self.log_level = log_level  # INFO logs each login ("Accepted publickey") and logout to self.log
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host_key = self.directory / "ssh_host_ed25519_key"
        self.client_key = self.directory / "client_ed25519"
        self.authorized_keys = self.directory / "authorized_keys"
        self.config = self.directory / "sshd_config"
        self.log = self.directory / "sshd.log"
        self.user = getpass.getuser()
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def host_public_key(self) -> str:
        """'ssh-ed25519 AAAA... comment' of the server's host key."""
        return (self.directory / "ssh_host_ed25519_key.pub").read_text().strip()

    def known_hosts_line(self, host: str = "127.0.0.1") -> str:
        key_type, key_body = self.host_public_key.split()[:2]
        name = host if self.port == 22 else f"[{host}]:{self.port}"
        return f"{name} {key_type} {key_body}"

    def regenerate_host_key(self) -> None:
        """Give the server a new host key (restart needed): a 'changed host'."""
        for path in (self.host_key, Path(f"{self.host_key}.pub")):
            path.unlink(missing_ok=True)
        _keygen(self.host_key, "gpuflow-test-host")

    def start(self, port: int | None = None) -> SshServer:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        if not self.host_key.exists():
            _keygen(self.host_key, "gpuflow-test-host")
        if not self.client_key.exists():
            _keygen(self.client_key, "gpuflow-test-client")
            self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        self.port = port or self.port or free_port()
        self.config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    f"PidFile {self.directory / 'sshd.pid'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    f"AllowUsers {self.user}",
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 100:30:200",
                    "MaxSessions 50",
                    f"LogLevel {self.log_level}",
                    *self.extra_config,
                    "",
                ]
            )
        )
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115 - owned by the child
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError("sshd did not start listening within 10 s")

    def drop_sessions(self) -> None:
        """Kill every per-connection sshd child (ends live SSH sessions, as a
        dropped network would) while the listener keeps accepting."""
        if self.process is None:
            return
        children = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        for child in children:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(child), signal.SIGKILL)

    def stop(self) -> None:
        if self.process is None:
            return
        self.drop_sessions()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        self.process = None
