"""The one exception type a user of the training modules can cause.

Bad options, missing data files, an output directory that cannot be written: library
code raises :class:`TrainingError` with a one-line message that says what is wrong and
what to do; :func:`training.cli.run_cli` prints it as ``training: error: ...`` and
exits non-zero, without a traceback.
"""

from __future__ import annotations


class TrainingError(Exception):
    """A failure caused by the user's input, with a one-line message meant for them."""

    exit_code: int = 2
