"""One style for every command's --help: UPPERCASE metavars without type tags, optional arguments in [brackets].

typer's plain help shows ``NAME <str>``, ``{RUN}``, ``[name]``, ``<list[str]>``
and ``<int range>``; :func:`plain_command` walks the click command tree typer
builds and gives every parameter the one style, so a command added later
follows it without doing anything (tests/cli/test_help.py checks every one).
"""

from __future__ import annotations

from typing import Any

_PLAIN_CLASSES: dict[type, type] = {}


def _metavar_for(param: Any) -> str:
    if param.param_type_name == "argument":
        return (param.name or "value").upper()
    longest = max((*param.opts, *param.secondary_opts), key=len)
    return longest.lstrip("-").replace("-", "_").upper()


def _plain_class(cls: type) -> type:
    """``cls`` with its help rendering in the one style (made once per class)."""
    if cls not in _PLAIN_CLASSES:

        def display_type_rich(self: Any, ctx: Any) -> str | None:
            if self.param_type_name == "argument":
                return None  # the metavar alone: no `<str>` tag
            return self.metavar

        def usage_display_name(self: Any) -> str:
            name = self.metavar or _metavar_for(self)
            if name.startswith("["):  # already spelled out (`[NAME] [MODULE]`)
                return name
            return name if self.required else f"[{name}]"

        _PLAIN_CLASSES[cls] = type(
            f"Plain{cls.__name__}",
            (cls,),
            {"display_type_rich": display_type_rich, "_usage_display_name": usage_display_name},
        )
    return _PLAIN_CLASSES[cls]


def plain_command(command: Any) -> Any:
    """``command`` (and its subcommands) with every parameter in the one help style; returns it."""
    for param in getattr(command, "params", []):
        takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
        if param.metavar is None and takes_value:
            param.metavar = _metavar_for(param)
        if param.param_type_name == "argument" and param.nargs != 1 and not param.metavar.startswith("["):
            param.metavar = f"{param.metavar.rstrip('.')}..."
        if hasattr(type(param), "display_type_rich"):
            param.__class__ = _plain_class(type(param))
    for sub in getattr(command, "commands", {}).values():
        plain_command(sub)
    return command
