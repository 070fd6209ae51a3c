"""A realistic EC2 console output around cloud-init's host key blocks, built
from real public keys (so a test can pin a key of the loopback sshd through
the same parser that reads a real instance's console)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

_BOOT_NOISE = [
    "[    0.000000] Linux version 6.8.0-1015-aws (buildd@lcy02-amd64-077) (x86_64-linux-gnu-gcc-13) #16-Ubuntu SMP",
    "[    0.000000] Command line: BOOT_IMAGE=/vmlinuz-6.8.0-1015-aws root=PARTUUID=5f1a2e7c-01 ro console=tty1 console=ttyS0",
    "[   11.904512] cloud-init[612]: Cloud-init v. 24.1.3-0ubuntu3.3 running 'init' at Sat, 28 Nov 2026 01:02:01 +0000.",
    "[   12.301177] cloud-init[612]: ci-info: ++++++++++++++++++++++++++Net device info+++++++++++++++++++++++++++",
    "[   12.611928] cloud-init[612]: Generating public/private ed25519 key pair.",
    "[   12.612310] cloud-init[612]: The key fingerprint is:",
    "[   12.612702] cloud-init[612]: SHA256:Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5ZnJlZA root@ip-172-31-5-9",
]


def fingerprint_line(public_key_file: Path) -> str:
    """`ssh-keygen -l -f FILE`: '256 SHA256:... comment (ED25519)', as cloud-init prints it."""
    return subprocess.run(
        ["ssh-keygen", "-l", "-f", str(public_key_file)], capture_output=True, text=True, check=True
    ).stdout.strip()


def console_output(
    public_keys: Sequence[str],
    fingerprints: Sequence[str],
    *,
    syslog_prefix: str = "<14>Nov 28 01:02:03 ec2: ",
    include_keys: bool = True,
) -> str:
    """The console text: boot noise, the fingerprints block through syslog, the
    keys block, more noise; CRLF line ends as the serial console gives them."""
    lines = list(_BOOT_NOISE)
    lines += [
        f"{syslog_prefix}",
        f"{syslog_prefix}#############################################################",
        f"{syslog_prefix}-----BEGIN SSH HOST KEY FINGERPRINTS-----",
        *(f"{syslog_prefix}{line}" for line in fingerprints),
        f"{syslog_prefix}-----END SSH HOST KEY FINGERPRINTS-----",
        f"{syslog_prefix}#############################################################",
    ]
    if include_keys:
        lines += ["-----BEGIN SSH HOST KEY KEYS-----", *public_keys, "-----END SSH HOST KEY KEYS-----"]
    lines += [
        "[   15.872140] cloud-init[1021]: Cloud-init v. 24.1.3-0ubuntu3.3 finished at Sat, 28 Nov 2026 01:02:05 +0000."
        " Datasource DataSourceEc2Local.  Up 15.85 seconds",
        "",
        "Ubuntu 24.04.1 LTS ip-172-31-5-9 ttyS0",
        "",
        "ip-172-31-5-9 login: ",
    ]
    return "\r\n".join(lines)


def server_console_output(server, **options) -> str:
    """The console output an instance running ``server`` (a tests.sshd.SshServer) would print."""
    public_key_file = Path(f"{server.host_key}.pub")
    return console_output([public_key_file.read_text().strip()], [fingerprint_line(public_key_file)], **options)
