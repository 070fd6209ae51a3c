"""The caller's public IPv4 address, for the security group's single /32 rule.

Asked of https://checkip.amazonaws.com (AWS's own echo service) only when the
user gave no ``--ssh-cidr`` and the cluster is not in the sandbox; callers
inject another detector in tests, which must never reach the network.
"""

from __future__ import annotations

import ipaddress

from infra.errors import CloudError

CHECKIP_URL = "https://checkip.amazonaws.com"


def detect_caller_ip(timeout_seconds: float = 5.0) -> str:
    """The public address this machine's traffic leaves from."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=timeout_seconds) as response:  # noqa: S310 - fixed https URL
            text = response.read(64).decode("ascii", errors="replace").strip()
    except (urllib.error.URLError, OSError) as exc:
        raise CloudError(
            f"cannot detect your public IP address via {CHECKIP_URL}: {exc}",
            hint="pass --ssh-cidr YOUR.IP.ADDRESS/32",
        ) from exc
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise CloudError(
            f"{CHECKIP_URL} answered {text!r}, not an IP address", hint="pass --ssh-cidr YOUR.IP.ADDRESS/32"
        ) from exc
