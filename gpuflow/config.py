"""Where gpuflow keeps things, and the project's configuration (one typed reader).

Precedence for every setting: command-line option > project config
(``gpuflow.toml`` in the project directory, else ``[tool.gpuflow]`` in
``pyproject.toml``) > built-in default.

:func:`read_project_config` is the one reader: it validates every key (an
unknown key is an error naming the closest known one) and every value's type,
and reports each problem in one line naming the file and the line.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpuflow.errors import ConfigError
from gpuflow.home import ENV_HOME, home_path  # noqa: F401 - ENV_HOME re-exported

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_DEBUG = "GPUFLOW_DEBUG"

PROJECT_CONFIG_NAME = "gpuflow.toml"
PYPROJECT_NAME = "pyproject.toml"


def gpuflow_home(environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding keys, known_hosts, state and the sandbox.

    ``$GPUFLOW_HOME`` if set, else ``~/.gpuflow``.  Created with mode 0700
    because it holds private keys.
    """
    home = Path(home_path(environ))
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(ENV_DEBUG, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------- the typed config
@dataclass(frozen=True)
class ClusterSettings:
    """Defaults for ``gpuflow up`` (None: not set in the project)."""

    region: str | None = None
    instance_type: str | None = None
    count: int | None = None
    spot: bool | None = None
    spot_fallback: bool | None = None
    disk_gb: int | None = None
    idle_minutes: int | None = None
    max_hours: float | None = None
    ami: str | None = None
    key_name: str | None = None
    key_path: str | None = None
    ssh_cidr: str | None = None
    allow_cpu: bool | None = None
    profile: str | None = None
    tensorflow_dlami: str | None = None  # pin the TensorFlow DLAMI version, e.g. "2.18"


@dataclass(frozen=True)
class SyncSettings:
    """Thresholds of the large-tree warning of ``gpuflow sync``."""

    sync_warn_gb: float | None = None
    sync_warn_files: int | None = None


@dataclass(frozen=True)
class JobSettings:
    """How jobs start on the instance."""

    remote_python: str | None = None
    entry: str | None = None  # the project's training entry point (`gpuflow init`; gpuflow.testing's smoke test runs it)


@dataclass(frozen=True)
class RecoverySettings:
    """Defaults for ``gpuflow run --recover`` (lists are comma-separated, as on the command line)."""

    recover: bool | None = None
    max_restarts: int | None = None
    fallback_types: str | None = None  # "g6.xlarge,g4dn.xlarge"
    restart_on_exit_codes: str | None = None  # "1,2"
    max_dollars: float | None = None


@dataclass(frozen=True)
class SandboxSshSettings:
    """The ``[sandbox_ssh]`` table: a loopback sshd that plays the sandbox's instances."""

    host: str | None = None
    port: int | None = None
    user: str | None = None
    key: str | None = None
    host_key: str | None = None


@dataclass(frozen=True)
class ProjectConfig:
    """The ``gpuflow`` settings of one project directory, validated."""

    root: Path
    source: Path | None  # the file the settings came from, None when defaults only
    cluster_name: str | None = None  # `cluster` (or its older spelling `name`)
    sandbox: bool | None = None
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    sandbox_ssh: SandboxSshSettings | None = None


_TOP_LEVEL_TYPES: dict[str, type] = {"cluster": str, "name": str, "sandbox": bool}
_SECTIONS: dict[str, type] = {
    "cluster": ClusterSettings, "sync": SyncSettings, "jobs": JobSettings, "recovery": RecoverySettings
}
_TABLES: dict[str, type] = {"sandbox_ssh": SandboxSshSettings}
_TYPE_NAMES = {"str": str, "int": int, "float": float, "bool": bool}


def _field_types(section: type) -> dict[str, type]:
    """A section's keys and their types, read from its dataclass (``X | None``)."""
    return {item.name: _TYPE_NAMES[str(item.type).split(" |")[0]] for item in fields(section)}


_SECTION_OF_KEY: dict[str, str] = {key: name for name, section in _SECTIONS.items() for key in _field_types(section)}
KNOWN_KEYS: frozenset[str] = frozenset({*_TOP_LEVEL_TYPES, *_SECTION_OF_KEY, *_TABLES})
_TENSORFLOW_VERSION = re.compile(r"[0-9]+\.[0-9]+")


# --------------------------------------------------------------------------- reading
def find_project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` holding gpuflow.toml,
    pyproject.toml or .git; ``start`` itself when none does."""
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if any((directory / marker).exists() for marker in (PROJECT_CONFIG_NAME, PYPROJECT_NAME, ".git")):
            return directory
    return start


def read_project_config(project_dir: Path) -> ProjectConfig:
    """The validated config of the project at ``project_dir`` (its root, as
    ``--project-dir`` names it): ``gpuflow.toml`` (whole file, or its
    ``[gpuflow]`` table), else ``[tool.gpuflow]`` of ``pyproject.toml``, else
    defaults.  Raises :class:`ConfigError` naming the file and line."""
    root = Path(project_dir).resolve()
    dedicated = root / PROJECT_CONFIG_NAME
    pyproject = root / PYPROJECT_NAME
    if dedicated.is_file():
        text, data = _read_toml_text(dedicated)
        if isinstance(data.get("gpuflow"), dict):
            outside = [key for key in data if key != "gpuflow"]
            if outside:
                raise ConfigError(
                    f"{_where(dedicated, text, outside[0], ())}: {outside[0]!r} is outside the [gpuflow] table",
                    hint="put every setting in [gpuflow], or write them all without the table",
                )
            return _build(root, dedicated, text, data["gpuflow"], ("gpuflow",))
        return _build(root, dedicated, text, data, ())
    if pyproject.is_file():
        text, data = _read_toml_text(pyproject)
        tool = data.get("tool", {})
        settings = tool.get("gpuflow") if isinstance(tool, dict) else None
        if settings is not None:
            return _build(root, pyproject, text, settings, ("tool", "gpuflow"))
    return ProjectConfig(root=root, source=None)


def project_config(project_dir: Path | None) -> ProjectConfig:
    """The config of the project a command works on: :func:`read_project_config`
    of ``project_dir`` (the CLI always names it: ``--project-dir``, else the
    project around the current directory, decided there).  None -- a library
    caller that names no project -- reads the project around the current directory."""
    return read_project_config(project_dir if project_dir is not None else find_project_root())



def read_user_text(path: Path) -> str:
    """A text file the user wrote (config, ignore file, requirements), as UTF-8;
    a byte order mark is skipped.  Unreadable or not UTF-8: :class:`ConfigError`
    naming the file and the line.  FileNotFoundError propagates."""
    try:
        raw = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark (Windows editors write one; git skips it)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})", hint="save the file as UTF-8"
        ) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's data (kept for today's callers: runs.requirements_of)."""
    return _read_toml_text(path)[1]


def _read_toml_text(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = read_user_text(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if found:
            where = f"{path}:{found.group(1)}"
            message = message[: found.start()]
        else:
            where = f"{path}:{text.count(chr(10)) + (0 if text.endswith(chr(10)) else 1)}"
            message = message.replace(" (at end of document)", " at the end of the file")
        raise ConfigError(f"{where}: not valid TOML: {message}") from exc


def _build(root: Path, source: Path, text: str, table: Any, table_path: tuple[str, ...]) -> ProjectConfig:
    label = "[" + ".".join(table_path) + "]" if table_path else "the file"
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {label} must be a table of settings")
    settings = _normalised_keys(source, text, table, table_path, KNOWN_KEYS)
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    sandbox_ssh: SandboxSshSettings | None = None
    for key, (written, value) in settings.items():
        if key in _TABLES:
            nested_path = (*table_path, written)
            if not isinstance(value, dict):
                raise ConfigError(f"{_where(source, text, written, table_path)}: {key} must be a table")
            section = _TABLES[key]
            types = _field_types(section)
            nested = _normalised_keys(source, text, value, nested_path, frozenset(types))
            checked = {
                name: _checked(source, text, nested_path, written_name, item, types[name])
                for name, (written_name, item) in nested.items()
            }
            sandbox_ssh = section(**checked)
            values[key] = checked
            continue
        expected = _TOP_LEVEL_TYPES.get(key) or _field_types(_SECTIONS[_SECTION_OF_KEY[key]])[key]
        checked_value = _checked(source, text, table_path, written, value, expected)
        if key == "tensorflow_dlami" and not _TENSORFLOW_VERSION.fullmatch(checked_value):
            raise ConfigError(
                f"{_where(source, text, written, table_path)}: tensorflow_dlami must be a TensorFlow version"
                f" such as \"2.18\", got {checked_value!r}"
            )
        values[key] = checked_value
        if key in _SECTION_OF_KEY:
            sections[_SECTION_OF_KEY[key]][key] = checked_value
    if "cluster" in values and "name" in values and values["cluster"] != values["name"]:
        raise ConfigError(f"{source}: cluster and name disagree ({values['cluster']!r}, {values['name']!r})",
                          hint="keep only cluster")
    return ProjectConfig(
        root=root,
        source=source,
        cluster_name=values.get("cluster", values.get("name")),
        sandbox=values.get("sandbox"),
        cluster=ClusterSettings(**sections["cluster"]),
        sync=SyncSettings(**sections["sync"]),
        jobs=JobSettings(**sections["jobs"]),
        recovery=RecoverySettings(**sections["recovery"]),
        sandbox_ssh=sandbox_ssh,
    )


def _normalised_keys(
    source: Path, text: str, table: dict[str, Any], table_path: tuple[str, ...], known: frozenset[str]
) -> dict[str, tuple[str, Any]]:
    """Keys with either spelling (``instance-type`` / ``instance_type``) as
    ``{normalised: (as written, value)}``; an unknown or doubled key is an error."""
    result: dict[str, tuple[str, Any]] = {}
    for written, value in table.items():
        key = str(written).replace("-", "_")
        where = _where(source, text, written, table_path)
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known settings: {', '.join(sorted(known))}"
            raise ConfigError(f"{where}: unknown setting {written!r}{_in_table(table_path)}", hint=hint)
        if key in result:
            raise ConfigError(f"{where}: {key} is set twice ({result[key][0]!r} and {written!r})")
        result[key] = (written, value)
    return result


def _checked(source: Path, text: str, table_path: tuple[str, ...], written: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        key = str(written).replace("-", "_")
        raise ConfigError(
            f"{_where(source, text, written, table_path)}: {key} must be of type {expected.__name__}, got {value!r}"
        )
    return value


def _in_table(table_path: tuple[str, ...]) -> str:
    return f" in [{'.'.join(table_path)}]" if table_path else ""


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]*?)\s*\]\]?\s*(#.*)?$")


def _where(source: Path, text: str, key: str, table_path: tuple[str, ...]) -> str:
    """``file:line`` of ``key`` in the table ``table_path`` (``file`` alone when
    the key is written in a way this simple scan does not follow)."""
    current: tuple[str, ...] = ()
    key_line = re.compile(r"""^\s*(["']?)""" + re.escape(str(key)) + r"""\1\s*=""")
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            current = tuple(part.strip().strip("\"'") for part in header.group(1).split("."))
            continue
        if current == table_path and key_line.match(line):
            return f"{source}:{number}"
    return str(source)
