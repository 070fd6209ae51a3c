"""Whether `gpuflow run MODULE` names a module that exists, checked locally before anything is synced or launched.

Pure: reads the file system only (no import of the module, of TensorFlow or of
the shipped ``training`` package).  ``python -m MODULE`` runs on the instance in
the synced project directory, with the installed ``training`` package shipped
when the project has none of its own, so MODULE must be, there:

* a module file ``a/b/c.py`` (``a`` and ``a/b`` directories: packages or
  namespace packages), or a package directory ``a/b/c/`` with ``__main__.py``;
* in the project when its first part is a file or directory of the project
  (the project shadows everything), else in the shipped ``training`` package.

Any other module (the standard library's, an installed one) is run as a
command after `--`: ``gpuflow run -- python -m http.server``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

from gpuflow.errors import NotFound, UsageError

SHIPPED_PACKAGE = "training"
_SKIPPED_DIRECTORIES = frozenset({"__pycache__", "runs", "node_modules", "site-packages"})
_MAX_DEPTH = 4
_MAX_CANDIDATES = 5000


def is_module_name(module: str) -> bool:
    return bool(module) and all(part.isidentifier() for part in module.split("."))


def require_module_name(module: str) -> None:
    """Raise a one-line error unless ``module`` is a dotted Python module name (``python -m`` takes nothing else)."""
    if not is_module_name(module):
        raise UsageError(
            f"{module!r} is not a Python module name",
            hint="e.g. training.cifar10_cnn; a command goes after `--`: gpuflow run [NAME] -- python train.py",
        )


def shipped_root() -> Path | None:
    """The directory that holds the installed ``training`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def _root_for(top: str, project_dir: Path, shipped: Path | None) -> Path | None:
    """Where ``python -m top.…`` finds ``top`` on the instance."""
    if top == SHIPPED_PACKAGE:
        # gpuflow.jobs.environment ships the installed package unless the project has a regular package of that name.
        return project_dir if (project_dir / top / "__init__.py").is_file() else shipped
    if (project_dir / f"{top}.py").is_file() or (project_dir / top).is_dir():
        return project_dir
    return None


def _runnable(root: Path, parts: list[str]) -> bool:
    *packages, last = parts
    directory = root.joinpath(*packages) if packages else root
    if packages and not directory.is_dir():
        return False
    return (directory / f"{last}.py").is_file() or (directory / last / "__main__.py").is_file()


def module_exists(module: str, project_dir: Path, *, shipped: Path | None = None) -> bool:
    """Whether ``python -m module`` finds a runnable module in the project or the shipped package."""
    if not is_module_name(module):
        return False
    parts = module.split(".")
    root = _root_for(parts[0], project_dir, shipped if shipped is not None else shipped_root())
    return root is not None and _runnable(root, parts)


def runnable_modules(root: Path, *, only: str | None = None) -> list[str]:
    """Module names runnable with ``python -m`` under ``root`` (a bounded walk; ``only``: one top-level name)."""
    found: list[str] = []
    for directory, subdirectories, files in os.walk(root):
        relative = Path(directory).relative_to(root).parts
        if len(relative) >= _MAX_DEPTH:
            subdirectories[:] = []
        subdirectories[:] = sorted(
            name for name in subdirectories
            if name.isidentifier() and name not in _SKIPPED_DIRECTORIES
            and (relative or only is None or name == only)
        )
        if relative and "__main__.py" in files:
            found.append(".".join(relative))
        for name in sorted(files):
            stem = name[:-3]
            if name.endswith(".py") and stem.isidentifier() and stem != "__main__" and stem != "__init__":
                if relative or only is None or stem == only:
                    found.append(".".join((*relative, stem)))
        if len(found) >= _MAX_CANDIDATES:
            break
    return found


def closest_module(word: str, project_dir: Path, *, shipped: Path | None = None) -> str | None:
    """The runnable module of the project or the shipped package whose name is closest to ``word``, if any is close."""
    shipped = shipped if shipped is not None else shipped_root()
    candidates = runnable_modules(project_dir)
    if shipped is not None and not (project_dir / SHIPPED_PACKAGE / "__init__.py").is_file():
        candidates += [name for name in runnable_modules(shipped, only=SHIPPED_PACKAGE) if "." in name]
    closest = difflib.get_close_matches(word, sorted(set(candidates) - {word}), n=1, cutoff=0.6)
    return closest[0] if closest else None


def check_module(module: str, project_dir: Path, *, also_not: str = "", shipped: Path | None = None) -> None:
    """Raise a one-line error when ``module`` is no runnable module of the project or the shipped package.

    ``also_not`` adds what else the word was tried as (``"a known cluster"``)."""
    require_module_name(module)
    shipped = shipped if shipped is not None else shipped_root()
    if module_exists(module, project_dir, shipped=shipped):
        return
    parts = module.split(".")
    root = _root_for(parts[0], project_dir, shipped)
    if root is not None and root.joinpath(*parts).is_dir():
        inside = [name for name in runnable_modules(root, only=parts[0]) if name.startswith(module + ".")]
        raise NotFound(
            f"{module!r} is a package without __main__.py: `python -m {module}` cannot run it",
            hint="name one of its modules: " + (", ".join(inside[:5]) + (", …" if len(inside) > 5 else "") if inside
                                                else f"it has none; add {module.replace('.', '/')}/__main__.py"),
        )
    closest = closest_module(module, project_dir, shipped=shipped)
    where = f"the project ({project_dir})" + (" or the shipped training package" if shipped is not None else "")
    subject = f"{module!r} is neither {also_not} nor a module of {where}" if also_not and "." not in module else f"no module {module!r} in {where}"
    hint = (
        f"did you mean {closest}?" if closest
        else f"a module installed on the instance runs as a command after `--`: gpuflow run [NAME] -- python -m {module}"
    )
    raise NotFound(subject, hint=hint)
