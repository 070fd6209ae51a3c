"""What a job runs with: its base interpreter, its virtualenv per requirements hash, its argv, the shipped training package."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

from gpuflow.config import _read_toml, read_project_config, read_user_text
from gpuflow.errors import NotFound, RemoteCommandFailed, UsageError
from gpuflow.jobs import scripts
from gpuflow.jobs.modulecheck import require_module_name
from gpuflow.jobs.records import TRAINING_PACKAGE, Say, quiet
from gpuflow.transport.base import CommandRunner

def base_python(runner: CommandRunner, project_dir: Path) -> str:
    """The interpreter jobs (and their virtualenvs) start from.

    The project's ``remote_python`` setting if given; else the first of the
    runner's ``job_pythons`` present on the target (an instance: the AMI's
    TensorFlow Python), else where the runner's ``python`` is (the sandbox and
    tests: the interpreter running gpuflow; an instance: ``python3``): the
    runner's ``base_python``, which over SSH comes with the connection.
    """
    configured = read_project_config(project_dir).jobs.remote_python
    if configured:
        return configured
    return runner.base_python or runner.python


def is_training_module(module: str | None) -> bool:
    return module is not None and (module == TRAINING_PACKAGE or module.startswith(TRAINING_PACKAGE + "."))


def build_job_argv(
    *, python: str, module: str | None, args: Sequence[str], output_dir: str, data_dir: str | None = None
) -> list[str]:
    """``python -m MODULE ARGS`` or the command ARGS, as an argv (never a string).

    A training module gets ``--output <run>/outputs`` (and, with ``gpuflow run
    --data``, ``--data-dir <the synced data>``) unless the user passed that
    option already.  A command starting with ``python``/``python3`` runs with
    the run's environment interpreter.
    """
    args = [str(arg) for arg in args]
    if module is not None:
        require_module_name(module)
        argv = [python, "-m", module, *args]
        if is_training_module(module):
            for option, value in (("--output", output_dir), ("--data-dir", data_dir)):
                given = any(arg == option or arg.startswith(option + "=") for arg in args)
                if value is not None and not given:
                    argv += [option, value]
        return argv
    if not args:
        raise UsageError("nothing to run", hint="give a module (training.cifar10_cnn) or a command after `--`")
    if args[0] in ("python", "python3"):
        return [python, *args[1:]]
    return args


# --------------------------------------------------------------------------- virtualenv


def requirements_of(project_dir: Path) -> str | None:
    """The project's requirements as requirements.txt text, or None.

    ``requirements.txt`` wins; else ``[project].dependencies`` of pyproject.toml.
    """
    requirements = project_dir / "requirements.txt"
    if requirements.is_file():
        text = read_user_text(requirements)
        meaningful = [line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        return text if meaningful else None
    pyproject = project_dir / "pyproject.toml"
    if pyproject.is_file():
        dependencies = _read_toml(pyproject).get("project", {}).get("dependencies") or []
        if dependencies:
            return "\n".join(sorted(str(item) for item in dependencies)) + "\n"
    return None


def requirements_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_environment(runner: CommandRunner, project_dir: Path, *, say: Say = quiet) -> str:
    """The interpreter the job runs with.

    No requirements: :func:`base_python` (the Deep Learning AMI's, with its
    TensorFlow; this interpreter in the sandbox).  Otherwise a virtualenv
    ``<base>/envs/<hash>/`` with ``--system-site-packages`` (so the AMI's
    TensorFlow is still used), created once per requirements hash under a
    lock and reused while the marker ``.gpuflow-ready`` exists.
    """
    interpreter = base_python(runner, project_dir)
    text = requirements_of(project_dir)
    if text is None:
        return interpreter
    digest = requirements_hash(text)
    env_dir = f"{runner.base_dir}/envs/{digest}"
    requirements_path = f"{env_dir}.requirements.txt"
    runner.put_bytes(text.encode(), requirements_path)
    script = scripts.prepare_environment_script(
        env_dir=env_dir, base_python=interpreter, requirements=requirements_path
    )
    say(f"preparing the environment {digest} (once per requirements hash)")
    result = runner.run_script(script, timeout=3600, check=False)
    if not result.ok:
        tail = (result.stderr or result.stdout).decode(errors="replace").strip()[-400:]
        raise RemoteCommandFailed(
            f"preparing the environment from the project's requirements failed: {tail}",
            hint="fix requirements.txt / [project].dependencies and run again",
        )
    if result.text().strip().endswith("reused"):
        say(f"reusing the environment {digest}")
    return f"{env_dir}/bin/python"


def _package_tarball(package_name: str) -> bytes:
    """The installed package ``package_name`` as an uncompressed tar (no caches)."""
    spec = importlib.util.find_spec(package_name)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"the {package_name!r} package is not installed here", hint="pip install gpuflow[train]")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    buffer = io.BytesIO()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
            return None
        return info

    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(package_dir, arcname=package_name, filter=keep)
    return buffer.getvalue()


def ship_package(runner: CommandRunner, package_name: str, site_dir: str) -> None:
    tar_path = f"{site_dir}.tar"
    runner.put_bytes(_package_tarball(package_name), tar_path)
    runner.run_script(scripts.unpack_script(tar_path, site_dir), timeout=120)
