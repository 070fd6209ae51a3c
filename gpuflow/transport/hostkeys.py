"""Host keys: read them from an instance's console output, pin them in a known_hosts file.

Pure Python (no paramiko): the CLI's ``gpuflow ssh`` / ``ssh-config`` and the
SSH transport share it.

Why the console output: cloud-init's ``write-ssh-key-fingerprints`` prints the
instance's freshly generated host keys to the serial console during first
boot, which EC2 returns through ``GetConsoleOutput`` — a channel that does not
go through the network path an attacker could sit on.  Its output (through
``logger --stderr -t ec2``) looks like this, each line possibly prefixed by a
syslog header (``<14>Nov 28 01:02:03 ec2: ``), by ``ec2: `` or by a kernel
timestamp, and with ``\\r\\n`` line ends::

    -----BEGIN SSH HOST KEY FINGERPRINTS-----
    256 SHA256:Qm3vF... root@ip-172-31-1-2 (ECDSA)
    256 SHA256:DvB8B... root@ip-172-31-1-2 (ED25519)
    -----END SSH HOST KEY FINGERPRINTS-----
    -----BEGIN SSH HOST KEY KEYS-----
    ecdsa-sha2-nistp256 AAAAE2VjZHNh... root@ip-172-31-1-2
    ssh-ed25519 AAAAC3NzaC1lZDI1NTE5... root@ip-172-31-1-2
    -----END SSH HOST KEY KEYS-----

The keys block is what gets pinned.  When an image hides the keys (cloud-init's
``ssh_key_console_blacklist``) but prints the fingerprints, the transport
accepts exactly a key whose SHA256 fingerprint was printed, then pins it.

A per-cluster known_hosts file holds one line per (host pattern, key); the host
pattern is ``host`` for port 22 and ``[host]:port`` otherwise, as OpenSSH and
paramiko both expect.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpuflow.state import atomic_write_bytes, locked

KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
KEYS_END = "-----END SSH HOST KEY KEYS-----"
FINGERPRINTS_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
FINGERPRINTS_END = "-----END SSH HOST KEY FINGERPRINTS-----"

# Host key algorithms OpenSSH servers use (DSA is gone from OpenSSH and paramiko 4+).
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)

_KEY_PATTERN = re.compile(
    r"(?:^|[\s:])(?P<key_type>" + "|".join(re.escape(t) for t in HOST_KEY_TYPES) + r")"
    r"\s+(?P<key_base64>[A-Za-z0-9+/]{16,}={0,3})(?:\s+(?P<comment>\S[^\r\n]*?))?\s*$"
)
_FINGERPRINT_PATTERN = re.compile(
    r"(?:^|[\s:])(?P<bits>\d{3,5})\s+SHA256:(?P<digest>[A-Za-z0-9+/]{43})=?(?:\s+(?P<rest>[^\r\n]*?))?\s*$"
)


@dataclass(frozen=True)
class PublicHostKey:
    """One host public key as a known_hosts line carries it."""

    key_type: str
    key_base64: str
    comment: str = field(default="", compare=False)  # not part of the key's identity

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.key_base64)

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` exactly as ``ssh-keygen -l`` and ssh print it."""
        return sha256_fingerprint(self.blob)

    def known_hosts_line(self, host_pattern: str) -> str:
        return f"{host_pattern} {self.key_type} {self.key_base64}"


@dataclass(frozen=True)
class ConsoleHostKeys:
    """What one console output says about an instance's host keys."""

    keys: tuple[PublicHostKey, ...] = ()
    fingerprints: tuple[str, ...] = ()  # 'SHA256:...' values from the fingerprints block

    @property
    def empty(self) -> bool:
        return not self.keys and not self.fingerprints


def sha256_fingerprint(key_blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def host_pattern(host: str, port: int = 22) -> str:
    """The name a key is filed under in known_hosts (OpenSSH's convention)."""
    return host if int(port) == 22 else f"[{host}]:{int(port)}"


def parse_public_key(text: str) -> PublicHostKey:
    """Parse ``type base64 [comment]`` (a ``.pub`` file or a known_hosts key part).

    Raises ValueError when the text is not a well-formed host public key.
    """
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        raise ValueError("expected 'TYPE BASE64 [COMMENT]'")
    key = PublicHostKey(parts[0], parts[1], parts[2] if len(parts) > 2 else "")
    _check_key(key)
    return key


def _check_key(key: PublicHostKey) -> None:
    """The blob must decode and name its own type first (SSH wire format), so
    a line mangled on the console is refused instead of pinned."""
    if key.key_type not in HOST_KEY_TYPES:
        raise ValueError(f"unsupported host key type {key.key_type!r}")
    try:
        blob = base64.b64decode(key.key_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("host key is not valid base64") from exc
    if len(blob) < 4:
        raise ValueError("host key blob is too short")
    (name_length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + name_length] != key.key_type.encode():
        raise ValueError(f"host key blob does not hold a {key.key_type} key")


def _blocks(lines: list[str], begin: str, end: str) -> list[list[str]]:
    """Every complete BEGIN..END block (a truncated one is ignored)."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if begin in line:
            current = []
        elif end in line:
            if current is not None:
                blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def parse_console_output(console: str) -> ConsoleHostKeys:
    """The host keys and fingerprints cloud-init printed.

    The last complete block of each kind wins (a rebooted instance prints them
    again; EC2 returns only the tail of the output, so an early block may be cut).
    Keys that contradict a SHA256 fingerprints block of the same boot are
    dropped: both come from the same script, so a difference means a mangled line.
    """
    lines = console.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    keys: list[PublicHostKey] = []
    key_blocks = _blocks(lines, KEYS_BEGIN, KEYS_END)
    if key_blocks:
        for line in key_blocks[-1]:
            match = _KEY_PATTERN.search(line)
            if not match:
                continue
            key = PublicHostKey(match["key_type"], match["key_base64"], (match["comment"] or "").strip())
            try:
                _check_key(key)
            except ValueError:
                continue
            if key not in keys:
                keys.append(key)
    fingerprints: list[str] = []
    fingerprint_blocks = _blocks(lines, FINGERPRINTS_BEGIN, FINGERPRINTS_END)
    if fingerprint_blocks:
        for line in fingerprint_blocks[-1]:
            match = _FINGERPRINT_PATTERN.search(line)
            if match and f"SHA256:{match['digest']}" not in fingerprints:
                fingerprints.append(f"SHA256:{match['digest']}")
    if keys and fingerprints:
        keys = [key for key in keys if key.fingerprint in fingerprints]
    return ConsoleHostKeys(tuple(keys), tuple(fingerprints))


def read_known_hosts(path: Path | str) -> list[tuple[str, PublicHostKey]]:
    """(host pattern field, key) for each usable line; comments, markers
    (@cert-authority, @revoked) and hashed names are skipped."""
    entries: list[tuple[str, PublicHostKey]] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "@", "|")):
            continue
        fields = line.split(None, 1)
        if len(fields) != 2:
            continue
        try:
            entries.append((fields[0], parse_public_key(fields[1])))
        except ValueError:
            continue
    return entries


def pinned_keys(path: Path | str, host: str, port: int = 22) -> list[PublicHostKey]:
    """The keys pinned for ``host``:``port`` in one known_hosts file."""
    wanted = host_pattern(host, port)
    return [key for names, key in read_known_hosts(path) if wanted in names.split(",")]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of one known_hosts file between processes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with locked(path.with_name(f".{path.name}.lock")):
        yield


def pin_host_keys(path: Path | str, host: str, port: int, keys: Iterable[PublicHostKey]) -> list[str]:
    """Replace whatever ``host``:``port`` had in ``path`` with ``keys``, atomically.

    Other hosts' lines are kept untouched.  Returns the lines written for this host.
    """
    path = Path(path)
    keys = list(keys)
    if not keys:
        raise ValueError("no host keys to pin")
    pattern = host_pattern(host, port)
    new_lines = [key.known_hosts_line(pattern) for key in keys]
    with _locked(path):
        try:
            existing = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            existing = []
        kept = [line for line in existing if not _line_names(line, pattern)]
        atomic_write_bytes(path, ("\n".join([*kept, *new_lines]) + "\n").encode(), mode=0o600)
    return new_lines


def _line_names(line: str, pattern: str) -> bool:
    fields = line.strip().split(None, 1)
    return bool(fields) and not fields[0].startswith("#") and pattern in fields[0].split(",")
