"""Where gpuflow keeps things, and the project's configuration.

Precedence for every setting: command-line option > project config
(``gpuflow.toml`` in the project directory or a parent, else ``[tool.gpuflow]``
in ``pyproject.toml``) > built-in default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuflow.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_HOME = "GPUFLOW_HOME"
ENV_DEBUG = "GPUFLOW_DEBUG"


def gpuflow_home(environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding keys, known_hosts, state and the sandbox.

    ``$GPUFLOW_HOME`` if set, else ``~/.gpuflow``.  Created with mode 0700
    because it holds private keys.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_HOME)
    home = Path(raw).expanduser() if raw else Path.home() / ".gpuflow"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(ENV_DEBUG, "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class ProjectConfig:
    """The ``gpuflow`` settings of one project directory."""

    root: Path
    source: Path | None  # the file the settings came from, None when defaults only
    settings: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)


def find_project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` holding gpuflow.toml,
    pyproject.toml or .git; ``start`` itself when none does."""
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if any((directory / marker).exists() for marker in ("gpuflow.toml", "pyproject.toml", ".git")):
            return directory
    return start


def load_project_config(start: Path | None = None) -> ProjectConfig:
    """Read ``gpuflow.toml`` (whole file) or ``[tool.gpuflow]`` of pyproject.toml."""
    root = find_project_root(start)
    dedicated = root / "gpuflow.toml"
    pyproject = root / "pyproject.toml"
    if dedicated.is_file():
        data = _read_toml(dedicated)
        settings = data.get("gpuflow", data)  # accept a [gpuflow] table or top-level keys
        return ProjectConfig(root=root, source=dedicated, settings=_normalise(settings, dedicated))
    if pyproject.is_file():
        data = _read_toml(pyproject)
        settings = data.get("tool", {}).get("gpuflow")
        if settings is not None:
            return ProjectConfig(root=root, source=pyproject, settings=_normalise(settings, pyproject))
    return ProjectConfig(root=root, source=None, settings={})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _normalise(settings: Any, source: Path) -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise ConfigError(f"{source}: the gpuflow settings must be a table")
    # Accept both spellings of keys: instance-type and instance_type.
    return {str(key).replace("-", "_"): value for key, value in settings.items()}
