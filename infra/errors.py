"""The errors the cloud layer raises, and the one-line error base gpuflow builds on.

``infra`` imports nothing from ``gpuflow``, yet every error it raises must reach
the user as gpuflow's other errors do: one line, an optional hint, an exit code.
So the base class lives here and :mod:`gpuflow.errors` re-exports it (and these
four classes) under the same names: ``except gpuflow.errors.CloudError`` catches
what infra raises, and :mod:`gpuflow.cli._errors` maps them all in one place.

Exit codes (the table in :mod:`gpuflow.errors`): 1 generic, 2 bad usage or
input, 3 credentials, 5 the cloud refused or failed.
"""

from __future__ import annotations


class GpuflowError(Exception):
    """Base class: a failure with a message meant for the user.

    ``hint`` is an optional second sentence saying what to do about it; the CLI
    prints ``message`` and ``hint`` on one line.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.strip().replace("\n", " ")
        if self.hint:
            text = f"{text} ({self.hint.strip()})"
        return text


class UsageError(GpuflowError):
    """A bad option or a nonsense value given by the user (an unknown region,
    instance type or AMI, an invalid name or dead-man's-switch setting)."""

    exit_code = 2


class CredentialsError(GpuflowError):
    """No AWS credentials, or credentials AWS refuses."""

    exit_code = 3


class CloudError(GpuflowError):
    """The cloud API refused or failed a call."""

    exit_code = 5


class CapacityError(CloudError):
    """No capacity for the requested instance type (spot or on-demand)."""


__all__ = ["CapacityError", "CloudError", "CredentialsError", "GpuflowError", "UsageError"]
