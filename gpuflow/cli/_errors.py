"""Turn domain errors into one line on stderr and an exit code — the only place."""

from __future__ import annotations

import sys
import traceback

import typer

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException

from gpuflow.cli._help import plain_command
from gpuflow.config import debug_enabled
from gpuflow.errors import DetachedByInterrupt, GpuflowError, JobInterrupted


def error_line(message: str) -> str:
    return f"gpuflow: error: {message}"


def info_line(message: str) -> str:
    return f"gpuflow: {message}"


def run_app(app: typer.Typer, argv: list[str]) -> int:
    """Run the typer app with ``argv``; return the process exit code."""
    command = plain_command(typer.main.get_command(app))
    try:
        result = command.main(args=argv, prog_name="gpuflow", standalone_mode=False)
        # Not standalone, typer returns the code of a typer.Exit (Ctrl-C becomes Exit(130)) instead of raising it.
        if type(result) is int:
            if result == 130:
                print(error_line("interrupted"), file=sys.stderr)
            return result
        return 0
    except (DetachedByInterrupt, JobInterrupted) as exc:
        # Ctrl-C answered with "detach": a choice, not an error; the exit code still says it was interrupted.
        # A job that saved its checkpoint and exited 75: resumable, not a failure; exit 75 says so.
        print(info_line(exc.one_line()), file=sys.stderr)
        return exc.exit_code
    except GpuflowError as exc:
        _maybe_traceback()
        print(error_line(exc.one_line()), file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort as exc:
        # click turns Ctrl-C into Abort (older typer); a declined confirmation is an Abort too.
        interrupted = isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)
        print(error_line("interrupted" if interrupted else "aborted"), file=sys.stderr)
        return 130
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `gpuflow`: show the help
            exc.show()
            return 0
        # Bad option, missing argument, invalid value: click's message is already one line.
        print(error_line(exc.format_message()), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(error_line("interrupted"), file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless debugging
        _maybe_traceback()
        print(
            error_line(f"unexpected {type(exc).__name__}: {exc} (set GPUFLOW_DEBUG=1 for the traceback)"),
            file=sys.stderr,
        )
        return 1


def _maybe_traceback() -> None:
    if debug_enabled():
        traceback.print_exc()
