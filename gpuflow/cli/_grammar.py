"""The command-line grammar of commands that take a job or command after `--` (run, ssh): its help and its errors."""

from __future__ import annotations

import shlex
from typing import Any

from typer.core import TyperCommand

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import NoSuchOption
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import NoSuchOption

from gpuflow.errors import UsageError

JOB_ARGS = "gpuflow_job_args"
SAW_DOUBLE_DASH = "gpuflow_saw_double_dash"
ARGV = "gpuflow_argv"


class CommandAfterDoubleDash(TyperCommand):
    """A command whose job (or remote command) arguments go after `--`.

    With ``split`` (run), everything after the first `--` is kept apart in
    ``ctx.meta[JOB_ARGS]`` so that `run NAME MODULE -- ARGS` can tell its own
    positionals from the job's.  An option gpuflow does not know, given before
    `--` (`gpuflow run nc1 training.cifar10_cnn --dataset digits`), is a job
    argument in the wrong place: the error says so and shows the corrected
    command, instead of click's "No such option" with a look-alike option.
    ``own_positionals`` is how many positionals before `--` are gpuflow's own.
    """

    split = False
    own_positionals = 1

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[ARGV] = list(args)
        ctx.meta[SAW_DOUBLE_DASH] = "--" in args
        if self.split:
            if "--" in args:
                index = args.index("--")
                ctx.meta[JOB_ARGS] = list(args[index + 1 :])
                args = list(args[:index])
            else:
                ctx.meta[JOB_ARGS] = []
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as exc:
            if not self._after_a_positional(ctx.meta[ARGV], exc.option_name):
                raise  # before any positional it is no job argument: click's "No such option" and its look-alike
            raise self.misplaced(ctx, exc.option_name) from exc

    # ------------------------------------------------------------------ the corrected command
    def _options(self) -> dict[str, bool]:
        """Every option string of this command -> whether it takes a value."""
        options: dict[str, bool] = {"-h": False, "--help": False}
        for param in self.params:
            if getattr(param, "param_type_name", "") != "option":
                continue
            takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
            for name in (*param.opts, *param.secondary_opts):
                options[name] = takes_value
        return options

    def _after_a_positional(self, argv: list[str], option: str) -> bool:
        """Whether a positional comes before the unknown ``option`` in ``argv``."""
        options = self._options()
        tokens = iter(argv)
        for token in tokens:
            if token == "--":
                return False
            name = token.split("=", 1)[0]
            if token.startswith("-") and token != "-":
                if name in options:
                    if options[name] and "=" not in token:
                        next(tokens, None)
                    continue
                if name == option or token.startswith(option):  # `-la` is reported as `-l`
                    return False
                continue
            return True
        return False

    def corrected(self, argv: list[str]) -> list[str]:
        """``argv`` with the job's arguments moved after `--` (gpuflow's options and
        positionals stay before it)."""
        if "--" in argv:
            index = argv.index("--")
            before, after = argv[:index], argv[index + 1 :]
        else:
            before, after = list(argv), []
        options = self._options()
        keep: list[str] = []
        moved: list[str] = []
        positionals = 0
        moving = False
        tokens = iter(before)
        for token in tokens:
            name = token.split("=", 1)[0]
            if token.startswith("-") and token != "-" and name in options:
                keep.append(token)
                moving = False
                if options[name] and "=" not in token:
                    value = next(tokens, None)
                    if value is not None:
                        keep.append(value)
            elif token.startswith("-") and token != "-":
                moving = True
                moved.append(token)
            elif moving or positionals >= self.own_positionals:
                moved.append(token)
            else:
                positionals += 1
                keep.append(token)
        return [*keep, "--", *moved, *after]

    def corrected_line(self, ctx: Any) -> str:
        return shlex.join(["gpuflow", self.name or "", *self.corrected(ctx.meta.get(ARGV, []))])

    def misplaced(self, ctx: Any, option: str) -> Exception:
        return UsageError(
            f"{option} is not an option of `gpuflow {self.name}`: the job's arguments go after `--`",
            hint=self.corrected_line(ctx),
        )


class RunCommand(CommandAfterDoubleDash):
    split = True
    own_positionals = 2  # [NAME] [MODULE]

    def corrected(self, argv: list[str]) -> list[str]:
        line = super().corrected(argv)
        words = [token for token in line[: line.index("--")] if not token.startswith("-")]
        options = self._options()
        kept = line[: line.index("--")]
        values = {kept[i + 1] for i, token in enumerate(kept[:-1]) if options.get(token)}
        positionals = [word for word in words if word not in values]
        if len(positionals) == 1:
            from gpuflow import jobs

            if jobs.is_known_cluster(positionals[0]):  # `run nc1 --epochs 3`: a module is missing too
                index = line.index(positionals[0])
                line.insert(index + 1, "MODULE")
        return line


class SshCommand(CommandAfterDoubleDash):
    own_positionals = 1  # NAME

    def misplaced(self, ctx: Any, option: str) -> Exception:
        return UsageError(
            f"{option} is not an option of `gpuflow ssh`: the remote command goes after `--`",
            hint=self.corrected_line(ctx),
        )
