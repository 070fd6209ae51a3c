"""The SSH key file's permissions: refused as OpenSSH refuses them, with the ``chmod`` that fixes it."""

from __future__ import annotations

import os
import re
import shlex
import stat
from pathlib import Path

from gpuflow.errors import CredentialsError

# OpenSSH (sshkey_perm_ok) ignores a private key that its owner's group or others
# may access, whatever the server would accept; it then says one of these.
_OPENSSH_KEY_PERMISSION_WORDS = ("bad permissions", "UNPROTECTED PRIVATE KEY FILE")
_OPENSSH_TOO_OPEN = re.compile(r"Permissions (0?[0-7]{3,4}) for '(.+)' are too open")


def check_key_permissions(key_path: str) -> None:
    """Refuse, as OpenSSH does, a private key file owned by this user that its
    group or others may access: :class:`CredentialsError` with the fix.  A
    missing file is left to the caller that opens it."""
    try:
        status = Path(key_path).expanduser().stat()
    except OSError:
        return
    if status.st_uid == os.getuid() and status.st_mode & 0o077:
        raise _key_permission_error(key_path, stat.S_IMODE(status.st_mode))


def key_permission_error(ssh_stderr: str, key_path: str | None) -> CredentialsError | None:
    """The error to report when OpenSSH's ``ssh_stderr`` says it ignored a key
    for its permissions; None when it says something else."""
    if not any(words in ssh_stderr for words in _OPENSSH_KEY_PERMISSION_WORDS):
        return None
    found = _OPENSSH_TOO_OPEN.search(ssh_stderr)
    path = found.group(2) if found else key_path
    return _key_permission_error(path or "(your SSH key)", int(found.group(1), 8) if found else None)


def _key_permission_error(key_path: str, mode: int | None) -> CredentialsError:
    described = f"has mode {mode:04o}" if mode is not None else "is too open"
    return CredentialsError(
        f"SSH key {key_path} {described}: OpenSSH refuses a private key that group or others can access",
        hint=f"run `chmod 600 {shlex.quote(key_path)}`",
    )
