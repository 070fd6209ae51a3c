"""Typer's value coercion without pydantic where the outcome is known.

typer 0.29 coerces every parameter's value through a pydantic ``TypeAdapter``, built on
first use, so any command that sees a value (or a ``None`` default) of a non-bool
parameter imports pydantic and builds adapters: ~0.1-0.16 s for the import and ~10-17 ms
per adapter on this machine, a sixth of ``gpuflow run``'s time on the client.  For three
cases the outcome is fixed and needs no adapter, and they are answered here:

* ``None`` (an option not given): typer's ``RuntimeParam.coerce`` returns ``None``, or ``()``
  for a multi-value parameter, before it looks at the adapter;
* a ``str`` parameter (no custom parser) given a ``str``: typer's ``_parse_cli_str`` and
  pydantic's ``str`` validation return it unchanged;
* a ``list[str]`` parameter (no custom parser) given a list or tuple of ``str``: the same
  items in a new list.

Anything else (numbers, paths, choices, bytes, a bad value) goes to typer's own
coercion, which builds its adapter as before: same values, same errors.  Installed
only where typer has the hook this relies on (``typer.core._TyperParameter.get_runtime_param``);
elsewhere nothing changes.
"""

from __future__ import annotations

from typing import Any

_NO_SHORTCUT = object()


def shortcut(param: Any, value: Any) -> Any:
    """The coerced value when it is known without an adapter, else ``_NO_SHORTCUT``."""
    multi = bool(param.multiple or param.nargs == -1)
    if value is None:
        return () if multi else None
    descriptor = param.type_descriptor
    if descriptor.file_annotation is not None or descriptor.parameter_info.parser is not None:
        return _NO_SHORTCUT
    if descriptor.annotation is str and not multi and type(value) is str:
        return value
    if (
        descriptor.annotation == list[str]
        and multi
        and type(value) in (list, tuple)
        and all(type(item) is str for item in value)
    ):
        return list(value)
    return _NO_SHORTCUT


class _ShortcutCoercion:
    """Stands in for a parameter's typer ``RuntimeParam``: the shortcut, else the real one (built then)."""

    def __init__(self, param: Any, build: Any) -> None:
        self._param = param
        self._build = build
        self._real: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        known = shortcut(param, value)
        if known is not _NO_SHORTCUT:
            return known
        if self._real is None:
            self._real = self._build(self._param)
        return self._real.coerce(value, param=param, ctx=ctx)

    def __getattr__(self, name: str) -> Any:  # anything else typer asks: the real one
        if self._real is None:
            self._real = self._build(self._param)
        return getattr(self._real, name)


def install() -> bool:
    """Put the shortcut in front of typer's coercion (idempotent); False where typer lacks the hook."""
    try:
        from typer import core
    except ImportError:  # pragma: no cover
        return False
    parameter = getattr(core, "_TyperParameter", None)
    original = getattr(parameter, "get_runtime_param", None)
    if parameter is None or original is None:
        return False
    if getattr(original, "_gpuflow_shortcut", False):
        return True

    def get_runtime_param(self: Any) -> Any:
        if getattr(self, "_runtime_param", None) is None:
            self._runtime_param = _ShortcutCoercion(self, lambda param: _build(param))
        return self._runtime_param

    def _build(param: Any) -> Any:
        param._runtime_param = None  # typer's own builds it (and keeps it from then on)
        return original(param)

    get_runtime_param._gpuflow_shortcut = True  # type: ignore[attr-defined]
    parameter.get_runtime_param = get_runtime_param
    return True
