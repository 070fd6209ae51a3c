"""``gpuflow init``: the files that put a project's own training code under gpuflow's CI smoke test.

Writes, never replacing a file that exists (each write is atomic and fails if the
file appeared meanwhile):

* ``gpuflow.toml`` — every setting, commented out at its default, and the
  project's training ``entry`` point;
* ``.gpuflowignore`` — what ``gpuflow sync`` should leave home;
* ``tests/test_gpuflow_smoke.py`` — runs the entry point through the
  ``gpuflow_sandbox`` fixture (:mod:`gpuflow.testing`) with ``GPUFLOW_SMOKE=1``;
* ``.github/workflows/gpuflow.yml`` — checkout, Python, install, pytest; no AWS secrets.

The entry point: ``--entry``, else the one a gpuflow.toml that exists names,
else detected (``train.py``, ``main.py``, a ``training/`` package's module),
else asked for (``ask``), else an error saying to pass ``--entry``.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from gpuflow.clusters.spec import DEFAULT_INSTANCE_TYPE, DEFAULT_REGION
from gpuflow.jobs.recover import DEFAULT_MAX_RESTARTS
from gpuflow.config import KNOWN_KEYS, PROJECT_CONFIG_NAME, read_project_config
from gpuflow.errors import UsageError
from gpuflow.records import ClusterSpec
from gpuflow.sync import DEFAULT_LARGE_BYTES, DEFAULT_LARGE_FILES

IGNORE_NAME = ".gpuflowignore"
SMOKE_TEST_PATH = Path("tests") / "test_gpuflow_smoke.py"
WORKFLOW_PATH = Path(".github") / "workflows" / "gpuflow.yml"
SMOKE_VARIABLE = "GPUFLOW_SMOKE"
DETECTED_SCRIPTS = ("train.py", "main.py")
TRAINING_PACKAGE = "training"


class EntrySource(enum.Enum):
    GIVEN = "--entry"
    CONFIG = "gpuflow.toml"
    DETECTED = "detected"
    ASKED = "asked"


@dataclass(frozen=True)
class InitFile:
    path: Path  # relative to the project
    written: bool  # False: it existed and was kept as it is


@dataclass(frozen=True)
class InitReport:
    project_dir: Path
    entry: str
    entry_source: EntrySource
    files: tuple[InitFile, ...]

    def lines(self) -> list[str]:
        lines = [f"entry point: {self.entry} ({self.entry_source.value})"]
        for item in self.files:
            lines.append(f"{'wrote' if item.written else 'kept '} {item.path}" + ("" if item.written else " (exists)"))
        config = next(item for item in self.files if item.path == Path(PROJECT_CONFIG_NAME))
        if not config.written and self.entry_source is not EntrySource.CONFIG:
            lines.append(f'add entry = "{self.entry}" to the existing {PROJECT_CONFIG_NAME}: the smoke test runs what it names')
        lines.append(f"next: pip install 'gpuflow[sandbox]' pytest && python -m pytest {SMOKE_TEST_PATH}")
        return lines


# --------------------------------------------------------------------------- the entry point
def detect_entry(project_dir: Path) -> str | None:
    """``train.py``, else ``main.py``, else a ``training/`` package's module
    (``training/__main__.py``, ``training/train.py``, or its only module with a
    ``__main__`` guard); None when there is no such thing or more than one candidate."""
    for name in DETECTED_SCRIPTS:
        if (project_dir / name).is_file():
            return name
    package = project_dir / TRAINING_PACKAGE
    if not (package / "__init__.py").is_file():
        return None
    if (package / "__main__.py").is_file():
        return TRAINING_PACKAGE
    if (package / "train.py").is_file():
        return f"{TRAINING_PACKAGE}.train"
    guarded = sorted(
        path.stem for path in package.glob("*.py")
        if path.stem != "__init__" and re.search(r"""^if __name__ == ["']__main__["']""", _text(path), re.MULTILINE)
    )
    return f"{TRAINING_PACKAGE}.{guarded[0]}" if len(guarded) == 1 else None


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def check_entry(project_dir: Path, entry: str) -> str:
    """``entry`` as recorded: one line; a script that names no file here is refused."""
    entry = entry.strip()
    if not entry or "\n" in entry or "\0" in entry or '"' in entry or "\\" in entry:
        raise UsageError(f"invalid entry point {entry!r}", hint="give a script (train.py), a module (pkg.train) or a command")
    words = entry.split()
    script = next((word for word in words if word.endswith(".py")), None)
    if script is not None and not (project_dir / script).is_file():
        raise UsageError(f"entry point {entry!r}: {script} is not a file in {project_dir}",
                         hint="give the path relative to the project directory")
    return entry


def _entry_mentions_keras(project_dir: Path, entry: str) -> bool:
    """Whether the entry point's source names Keras or TensorFlow (then the smoke test loads its saved model)."""
    words = entry.split()
    candidates: list[Path] = [project_dir / word for word in words if word.endswith(".py")]
    if not candidates:
        module = next((word for word in words if re.fullmatch(r"[A-Za-z_][\w.]*", word) and word not in ("python", "python3", "-m")), "")
        base = project_dir.joinpath(*module.split(".")) if module else None
        if base is not None:
            candidates += [base.with_suffix(".py"), base / "__main__.py"]
    return any(re.search(r"\b(keras|tensorflow)\b", _text(path)) for path in candidates if path.is_file())


# --------------------------------------------------------------------------- the files
_SETTING_NOTES: dict[str, str] = {
    "cluster": "the cluster name up / run / down use (default: the project directory's name)",
    "sandbox": "true: the sandbox cloud (moto on this machine), never AWS",
    "region": "else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1",
    "instance_type": "a GPU type (--allow-cpu for others)",
    "count": "instances in the cluster",
    "spot": "one-time spot instances",
    "spot_fallback": "on-demand when no spot capacity",
    "disk_gb": "encrypted gp3 root volume",
    "idle_minutes": "the dead-man's switch: stop after this long idle",
    "max_hours": "the dead-man's switch: hard limit",
    "ami": "default: the newest TensorFlow Deep Learning AMI",
    "key_name": "your own EC2 key pair (with key_path); default: one per cluster",
    "key_path": "its private key file",
    "ssh_cidr": "who may reach SSH; default: your address /32",
    "allow_cpu": "allow instance types without a GPU",
    "profile": "AWS profile; default: the standard credential chain",
    "tensorflow_dlami": "pin the TensorFlow DLAMI version",
    "sync_warn_gb": "gpuflow sync warns above this many GB",
    "sync_warn_files": "... or this many files",
    "remote_python": "the job's interpreter on the instance; default: the DLAMI's",
    "recover": "run --recover: relaunch after a spot interruption, continue the run",
    "max_restarts": "run --recover: at most this many restarts",
    "fallback_types": "run --recover: types to relaunch on, in order",
    "restart_on_exit_codes": "run --recover: also restart these job failures",
    "max_dollars": "run --recover: stop (checkpoint saved) before this cost",
}
_EXAMPLES: dict[str, str] = {
    "cluster": '"my-project"', "ami": '"ami-0123456789abcdef0"', "key_name": '"my-key"',
    "key_path": '"~/.ssh/my-key.pem"', "ssh_cidr": '"203.0.113.7/32"', "profile": '"default"',
    "tensorflow_dlami": '"2.18"', "remote_python": '"/opt/conda/bin/python"',
    "fallback_types": '"g6.xlarge,g4dn.xlarge"', "restart_on_exit_codes": '"1,137"', "max_dollars": "20.0",
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def config_text(entry: str) -> str:
    """gpuflow.toml: ``entry`` set, every other setting commented out at its default."""
    spec_defaults = {item.name: item.default for item in fields(ClusterSpec)}
    defaults: dict[str, object] = {
        **spec_defaults, "region": DEFAULT_REGION, "instance_type": DEFAULT_INSTANCE_TYPE,
        "sync_warn_gb": DEFAULT_LARGE_BYTES / (1 << 30), "sync_warn_files": DEFAULT_LARGE_FILES,
        "recover": False, "max_restarts": DEFAULT_MAX_RESTARTS,
    }
    lines = [
        "# gpuflow settings for this project (written by `gpuflow init`).",
        "# Command-line options win over these, and these over gpuflow's defaults.",
        "# Every setting is listed at its default, commented out: uncomment one to change it.",
        "",
        "# The training entry point: a script (train.py), a module (pkg.train) or a command line.",
        f"# tests/test_gpuflow_smoke.py runs it in the sandbox cloud with {SMOKE_VARIABLE}=1 set.",
        f'entry = "{entry}"',
        "",
    ]
    for key, note in _SETTING_NOTES.items():
        default = defaults.get(key)
        value = _toml_value(default) if default is not None else _EXAMPLES[key]
        prefix = f"# {key} = {value}"
        suffix = note if default is not None or key == "cluster" else f"(not set) {note}"
        lines.append(f"{prefix:<40} # {suffix}")
    lines += [
        "",
        "# A loopback sshd that plays the sandbox's instances (tests of the SSH path):",
        "# [sandbox_ssh]",
        '# host = "127.0.0.1"',
        "# port = 2222",
        '# user = "me"',
        '# key = "~/.ssh/id_ed25519"',
        '# host_key = "ssh-ed25519 AAAA..."',
        "",
    ]
    return "\n".join(lines)


IGNORE_TEXT = """\
# What `gpuflow sync` / `gpuflow run` leave on this machine (gitignore syntax; .gitignore applies too).
# runs/ (pulled results) always stays home.
.venv/
venv/
__pycache__/
*.pyc
.pytest_cache/
.mypy_cache/
outputs/
*.egg-info/
# Large data goes to the instance once, with `gpuflow run --data DIR` or `gpuflow sync --data DIR`:
data/
"""

SMOKE_TEST_TEMPLATE = '''\
"""Smoke test written by `gpuflow init`: the project's training entry point (`entry` in
gpuflow.toml) runs through gpuflow's up -> run -> pull -> down path in the sandbox cloud
(moto on this machine: offline, no AWS account), as it would on a GPU instance.

The job gets {smoke}=1: let the script shrink itself when it sees it (one tiny epoch on a
few samples) and write its outputs, the saved model included, under $GPUFLOW_OUTPUT_DIR.
At teardown the gpuflow_sandbox fixture fails the test if anything is left: an instance,
a security group, a key pair, a sandbox directory or a running job process.
"""

import pytest

# Whether the entry point saves a Keras model (*.keras) that must load again.
EXPECT_KERAS_MODEL = {expect_model}


def test_training_entry_point_runs_in_the_sandbox(gpuflow_sandbox):
    gpuflow_sandbox.up()
    try:
        run = gpuflow_sandbox.run(gpuflow_sandbox.entry, env={{"{smoke}": "1"}})
    finally:
        gpuflow_sandbox.down()
    assert run.exit_code == 0, f"the entry point failed in the sandbox (exit code {{run.exit_code}}):\\n{{run.log}}"
    written = [path for path in run.outputs.rglob("*") if path.is_file()]
    assert written, "nothing came back from $GPUFLOW_OUTPUT_DIR: write the outputs there"
    if EXPECT_KERAS_MODEL:
        models = sorted(run.outputs.rglob("*.keras"))
        assert models, "no saved Keras model (*.keras) came back from $GPUFLOW_OUTPUT_DIR"
        keras = pytest.importorskip("keras", reason="loading the saved model needs keras")
        for path in models:
            keras.saving.load_model(path, compile=False)
'''

WORKFLOW_TEXT = """\
# Written by `gpuflow init`: the training entry point runs in gpuflow's sandbox cloud
# (moto on the runner) on every push and pull request. No AWS account, no secrets.
name: gpuflow smoke test
on: [push, pull_request]
permissions:
  contents: read
jobs:
  smoke:
    runs-on: ubuntu-latest
    timeout-minutes: 30
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - name: Install gpuflow with its sandbox cloud, pytest and the project's dependencies
        run: |
          python -m pip install "gpuflow[sandbox]" pytest
          if [ -f requirements.txt ]; then python -m pip install -r requirements.txt; fi
          if [ -f pyproject.toml ] || [ -f setup.py ]; then python -m pip install -e .; fi
      - name: Smoke test (offline, sandbox cloud)
        run: python -m pytest -p no:cacheprovider tests/test_gpuflow_smoke.py
"""


def smoke_test_text(expect_keras_model: bool) -> str:
    return SMOKE_TEST_TEMPLATE.format(smoke=SMOKE_VARIABLE, expect_model=expect_keras_model)


def write_new(path: Path, text: str) -> bool:
    """Write ``path`` atomically unless it exists; False when it does (kept as it is)."""
    if path.exists() or path.is_symlink():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # fails if the file appeared meanwhile: never replaces one
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


# --------------------------------------------------------------------------- the use case
def init_project(
    project_dir: Path, *, entry: str | None = None, ask: Callable[[str], str] | None = None
) -> InitReport:
    """``gpuflow init`` in ``project_dir``: see the module's docstring."""
    project_dir = Path(project_dir).resolve()
    if not project_dir.is_dir():
        raise UsageError(f"{project_dir} is not a directory")
    config_path = project_dir / PROJECT_CONFIG_NAME
    existing = read_project_config(project_dir).jobs.entry if config_path.is_file() else None
    if entry is not None:
        source = EntrySource.GIVEN
    elif existing:
        entry, source = existing, EntrySource.CONFIG
    else:
        entry, source = detect_entry(project_dir), EntrySource.DETECTED
        if entry is None:
            if ask is None:
                raise UsageError(
                    "no training entry point found (train.py, main.py or a training/ package's module)",
                    hint="pass it: gpuflow init --entry train/fit.py (a script, a module or a command)",
                )
            entry, source = ask("Training entry point (a script such as train.py, a module such as pkg.train)"), EntrySource.ASKED
    if source is not EntrySource.CONFIG:  # a recorded entry is the user's: kept as written
        entry = check_entry(project_dir, entry)
    planned = (
        (Path(PROJECT_CONFIG_NAME), config_text(entry)),
        (Path(IGNORE_NAME), IGNORE_TEXT),
        (SMOKE_TEST_PATH, smoke_test_text(_entry_mentions_keras(project_dir, entry))),
        (WORKFLOW_PATH, WORKFLOW_TEXT),
    )
    written: list[InitFile] = []
    for relative, text in planned:
        try:
            written.append(InitFile(relative, write_new(project_dir / relative, text)))
        except OSError as exc:
            done = [str(item.path) for item in written if item.written]
            raise UsageError(
                f"cannot write {relative}: {exc.strerror or exc}" + (f" (wrote {', '.join(done)})" if done else ""),
                hint=f"check that {project_dir} and its tests/ and .github/ are writable directories",
            ) from exc
    return InitReport(project_dir=project_dir, entry=entry, entry_source=source, files=tuple(written))


# Every project setting gpuflow knows is in the generated gpuflow.toml (tests check it).
DOCUMENTED_KEYS = frozenset({"entry", *_SETTING_NOTES, "sandbox_ssh"})
UNDOCUMENTED_KEYS = KNOWN_KEYS - DOCUMENTED_KEYS - {"name"}  # "name": the older spelling of "cluster"
