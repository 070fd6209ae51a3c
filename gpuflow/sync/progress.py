"""The sync's byte progress bar on stderr (rich), or nothing when it is not wanted."""

from __future__ import annotations


class Progress:
    """A rich progress bar on stderr, or nothing (not a TTY, --json, tests)."""

    def __init__(self, enabled: bool, total_bytes: int, description: str) -> None:
        self._bar = None
        self._task = None
        if enabled and total_bytes > 0:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total_bytes)

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
