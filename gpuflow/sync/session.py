"""Sync's one OpenSSH connection: its command line, the multiplexed session, and what an ssh failure means."""

from __future__ import annotations

import os
import shutil
import tempfile

from gpuflow.errors import HostKeyMismatch, UnreachableHost
from gpuflow.records import SSHTarget
from gpuflow.transport import hostkeys, openssh, shared
from gpuflow.transport.keys import key_permission_error


def ssh_argv(target: SSHTarget, control_path: str | None = None) -> list[str]:
    """The ``ssh`` command line (without the host) that reaches ``target``
    with its pinned host keys and nothing from ~/.ssh/config (the options of
    :mod:`gpuflow.transport.openssh`, as for `gpuflow ssh`)."""
    return openssh.ssh_argv(target, control_path=control_path)


def tail(data: bytes) -> str:
    """The end of a remote stderr, on one line, for an error message."""
    return data.decode("utf-8", errors="replace").strip().replace("\n", " ")[-300:]


def ssh_failure(target: SSHTarget, stderr: bytes, what: str) -> Exception:
    """Map an ssh exit status 255 to the domain error it means."""
    text = stderr.decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message from ssh"
    refused_key = key_permission_error(text, target.key_path)
    if refused_key is not None:
        return refused_key
    if "host key is known for" in text or "No matching host key" in text:
        return HostKeyMismatch(
            f"no key pinned in {target.known_hosts_path} for {target.host}:{target.port}; {what} refused",
            hint="pin the instance's host key first (gpuflow ssh NAME pins it from the console output)",
        )
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        return HostKeyMismatch(
            f"host key of {target.host}:{target.port} does not match the key pinned in {target.known_hosts_path}; "
            f"{what} refused",
            hint="if the instance was replaced on purpose, re-pin its key; otherwise do not connect",
        )
    if "host key for" in text and "has changed" in text:
        return HostKeyMismatch(f"host key of {target.host}:{target.port} changed; {what} refused")
    return UnreachableHost(f"cannot reach {target.host}:{target.port} over SSH for {what}: {last}")


class SshSession:
    """One OpenSSH connection for the whole sync.

    The listing session (:class:`~gpuflow.sync.exchange.Exchange`) opens it as a ControlMaster on a
    socket in a private temp directory; when rsync is used it rides on the same
    connection through that ``ControlPath`` while the listing session is kept
    open.  No ``ControlPersist``: the connection ends with the listing session,
    and nothing is left running if gpuflow is killed.

    Within a command's shared connections (:mod:`gpuflow.transport.shared`,
    ``gpuflow run``) the ``ssh`` is that scope's bridge instead: the listing
    session and rsync run on the command's one connection to the node.
    """

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        openssh.host_options(target)  # refuse a target without pinned keys before making anything
        # Within a command's scope (`gpuflow run`), ride on its one connection to the node.
        bridge = shared.bridge_argv(target)
        self._socket_directory = None if bridge else tempfile.mkdtemp(prefix="gpuflow-ssh-")
        if self._socket_directory is None:
            self.control_path = None
            self.base_argv = bridge
            self._master_options: list[str] = []
        else:
            # Short path: unix socket paths are limited to ~104 bytes on macOS.
            self.control_path = os.path.join(self._socket_directory, "%C")
            self.base_argv = ssh_argv(target, self.control_path)
            self._master_options = ["-o", "ControlMaster=yes"]

    def master_argv(self, remote_command: str) -> list[str]:
        return [*self.base_argv, *self._master_options, self.target.host, remote_command]

    def close(self) -> None:
        if self._socket_directory is not None:
            shutil.rmtree(self._socket_directory, ignore_errors=True)


def pin_on_first_use(target: SSHTarget) -> None:
    """OpenSSH never trusts a key on first use (:mod:`gpuflow.transport.openssh`):
    for a target that allows it and has no pinned key yet, the paramiko runner
    takes the presented key first (with its warning) and pins it, as `gpuflow
    ssh` does; the sync's ssh then finds it pinned."""
    if not target.trust_on_first_use or not target.known_hosts_path:
        return
    if hostkeys.pinned_keys(target.known_hosts_path, target.host, target.port):
        return
    from gpuflow.transport.ssh import SSHRunner

    with SSHRunner(target, touch_heartbeat=False) as runner:
        runner.check_host_key()
