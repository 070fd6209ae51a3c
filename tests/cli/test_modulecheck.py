"""gpuflow/jobs/modulecheck.py: where `python -m MODULE` will find MODULE on the instance, decided locally."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuflow.errors import NotFound, UsageError
from gpuflow.jobs.modulecheck import check_module, module_exists, shipped_root


def _files(root: Path, *paths: str) -> Path:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("")
    return root


def test_modules_files_packages_with_main_and_namespace_packages(tmp_path):
    project = _files(tmp_path, "a/b/c.py", "a/__init__.py", "ns/deep/mod.py", "runme/__main__.py", "top.py")
    for module in ("a.b.c", "ns.deep.mod", "runme", "top", "training.cifar10_cnn"):
        assert module_exists(module, project), module
    for module in ("a", "a.b", "a.b.d", "ns.deep", "top.x", "nothere", "training.nope", "training"):
        assert not module_exists(module, project), module


def test_a_project_training_package_shadows_the_shipped_one(tmp_path):
    project = _files(tmp_path, "training/__init__.py", "training/mine.py")
    assert module_exists("training.mine", project)
    assert not module_exists("training.cifar10_cnn", project)  # the project's own package is what runs
    with pytest.raises(NotFound) as refused:
        check_module("training.mien", project)
    assert "did you mean training.mine?" in refused.value.one_line()


def test_no_shipped_package_and_bad_names(tmp_path, monkeypatch):
    assert shipped_root() is not None
    project = _files(tmp_path, "x.py")
    with pytest.raises(NotFound) as refused:
        check_module("training.cifar10_cnn", project, shipped=tmp_path / "nowhere")
    assert "training.cifar10_cnn" in refused.value.one_line()
    for bad in ("a-b", "1abc", ".rel", "a..b", ""):
        with pytest.raises(UsageError):
            check_module(bad, project)
