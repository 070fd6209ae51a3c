"""How signals end gpuflow: SIGTERM like Ctrl-C, so that every cleanup path runs, for the whole process and for `run`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from gpuflow.errors import Terminated, TerminatedError


def terminate_like_ctrl_c() -> None:
    """A SIGTERM (a CI runner cancelling a job, ``kill``, a closing terminal
    multiplexer) ends gpuflow the way Ctrl-C does, so every cleanup path runs:
    ``up`` rolls back, ``run --down`` stops the job and tears the cluster down.
    A second SIGTERM ends gpuflow at once."""

    def interrupt(signal_number: int, _frame: object) -> None:
        signal.signal(signal_number, signal.SIG_DFL)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # not when the caller chose otherwise
        signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def ended_by_signals() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) and SIGTERM end `run` and `logs -f`, also without a terminal.

    SIGINT raises KeyboardInterrupt even when it was inherited as ignored (a
    shell starts `gpuflow run … &` that way); SIGTERM raises
    :class:`~gpuflow.errors.Terminated` (a KeyboardInterrupt), so a terminated
    gpuflow detaches, stops or tears down exactly as an interrupted one, and
    then exits 143.  Yields the signals received, newest last.
    """
    received: list[int] = []

    def interrupt(signal_number: int, _frame: Any) -> None:
        received.append(signal_number)
        raise Terminated() if signal_number == signal.SIGTERM else KeyboardInterrupt()

    watched = (signal.SIGINT, signal.SIGTERM)
    installed = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {number: signal.getsignal(number) for number in watched} if installed else {}
    for number in previous:
        signal.signal(number, interrupt)
    try:
        yield received
    except Terminated as exc:
        raise TerminatedError("terminated") from exc
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
