"""Which host key an SSH connection accepts: the pinned one, one the console vouched for, or (asked for) the first seen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpuflow.errors import HostKeyMismatch, SecurityError
from gpuflow.transport import hostkeys

if TYPE_CHECKING:
    from gpuflow.transport.ssh import SSHRunner


class PinningPolicy:
    """paramiko MissingHostKeyPolicy for a host with no pinned key of the
    presented type: refuse, unless the console fingerprints vouch for the key
    or the user asked for trust-on-first-use."""

    def __init__(self, runner: SSHRunner) -> None:
        self._runner = runner

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        runner = self._runner
        target = runner.target
        presented = hostkeys.sha256_fingerprint(key.asbytes())
        pinned = client.get_host_keys().get(hostname)
        if pinned:
            expected = ", ".join(
                f"{pinned[key_type].get_name()} {hostkeys.sha256_fingerprint(pinned[key_type].asbytes())}"
                for key_type in pinned.keys()
            )
            raise HostKeyMismatch(
                f"{hostname} presented {key.get_name()} {presented}, but the pinned host key is {expected}; "
                "nothing was sent",
                hint=f"someone may be intercepting the connection; if the instance was really rebuilt, "
                f"remove {target.known_hosts_path} and connect again",
            )
        if runner._expected_fingerprints:
            if presented not in runner._expected_fingerprints:
                raise HostKeyMismatch(
                    f"{hostname} presented {key.get_name()} {presented}, which is not among the fingerprints "
                    f"the instance printed on its console ({', '.join(runner._expected_fingerprints)}); "
                    "nothing was sent",
                    hint="someone may be intercepting the connection",
                )
            self._pin(key)
            return
        if target.trust_on_first_use:
            runner._warn(
                f"trusting {hostname}'s {key.get_name()} host key {presented} on first use, "
                f"without verification; pinned in {target.known_hosts_path}"
            )
            self._pin(key)
            return
        raise SecurityError(
            f"no pinned host key for {hostname} (it presented {key.get_name()} {presented}); refusing to connect",
            hint="gpuflow pins keys from the instance's console output; "
            "pass --trust-on-first-use to accept the key unverified",
        )

    def _pin(self, key: Any) -> None:
        target = self._runner.target
        if target.known_hosts_path:
            hostkeys.pin_host_keys(
                target.known_hosts_path,
                target.host,
                target.port,
                [hostkeys.PublicHostKey(key.get_name(), key.get_base64())],
            )
