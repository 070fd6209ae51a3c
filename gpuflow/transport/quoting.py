"""The one place an argv becomes a shell string (``shlex`` alone, so the `gpuflow ssh`
fast path can use it without the transport's records); :mod:`gpuflow.transport.base`
re-exports it."""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def quote_argv(argv: Sequence[str]) -> str:
    """The one place argv becomes a shell string."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a sequence of strings, not a string")
    return shlex.join(str(part) for part in argv)
