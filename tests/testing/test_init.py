"""`gpuflow init`: what it writes, what it keeps, how it finds the entry point (no cloud, no sandbox)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from gpuflow import project_init
from gpuflow.config import KNOWN_KEYS, read_project_config
from gpuflow.errors import ConfigError, UsageError
from gpuflow.project_init import EntrySource, detect_entry, init_project

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

WRITTEN = ["gpuflow.toml", ".gpuflowignore", "tests/test_gpuflow_smoke.py", ".github/workflows/gpuflow.yml"]


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def test_init_writes_the_four_files_and_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "train.py").write_text("print('fit')\n")
    monkeypatch.chdir(tmp_path)
    assert cli(["init"]) == 0
    out = capsys.readouterr().out
    assert "entry point: train.py (detected)" in out
    for name in WRITTEN:
        assert (tmp_path / name).is_file()
        assert f"wrote {name}" in out
    assert read_project_config(tmp_path).jobs.entry == "train.py"
    assert not list(tmp_path.rglob("*.tmp"))


def test_init_never_overwrites_and_says_what_it_kept(tmp_path, monkeypatch, capsys):
    (tmp_path / "train.py").write_text("print('fit')\n")
    (tmp_path / ".gpuflowignore").write_text("mine\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_gpuflow_smoke.py").write_text("# mine\n")
    monkeypatch.chdir(tmp_path)
    assert cli(["init"]) == 0
    out = capsys.readouterr().out
    assert "kept  .gpuflowignore (exists)" in out and "kept  tests/test_gpuflow_smoke.py (exists)" in out
    assert (tmp_path / ".gpuflowignore").read_text() == "mine\n"
    assert (tmp_path / "tests" / "test_gpuflow_smoke.py").read_text() == "# mine\n"
    before = {name: (tmp_path / name).read_bytes() for name in WRITTEN}
    assert cli(["init", "--entry", "main.py"]) == 2  # main.py does not exist: refused, nothing touched
    assert "main.py is not a file" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in WRITTEN} == before


def test_a_second_init_keeps_everything_and_uses_the_recorded_entry(tmp_path, capsys):
    (tmp_path / "train.py").write_text("")
    init_project(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in WRITTEN}
    (tmp_path / "train.py").unlink()  # nothing to detect now: the recorded entry decides
    report = init_project(tmp_path)
    assert report.entry == "train.py" and report.entry_source is EntrySource.CONFIG
    assert not any(item.written for item in report.files)
    assert {name: (tmp_path / name).read_bytes() for name in WRITTEN} == before


def test_an_existing_gpuflow_toml_is_kept_and_init_says_to_add_the_entry(tmp_path):
    (tmp_path / "gpuflow.toml").write_text('region = "eu-west-1"\n')
    (tmp_path / "main.py").write_text("")
    report = init_project(tmp_path)
    assert (tmp_path / "gpuflow.toml").read_text() == 'region = "eu-west-1"\n'
    assert any('add entry = "main.py" to the existing gpuflow.toml' in line for line in report.lines())


def test_a_symlink_in_the_way_is_kept_too(tmp_path):
    (tmp_path / "train.py").write_text("")
    (tmp_path / ".gpuflowignore").symlink_to(tmp_path / "elsewhere")  # dangling
    report = init_project(tmp_path)
    assert not next(item for item in report.files if item.path.name == ".gpuflowignore").written
    assert not (tmp_path / "elsewhere").exists()


def test_the_config_lists_every_setting_and_each_default_is_valid(tmp_path):
    text = project_init.config_text("train.py")
    assert project_init.UNDOCUMENTED_KEYS == frozenset()
    for key in KNOWN_KEYS - {"name"}:
        assert re.search(rf"^(# )?\[?{key}\]?( =|$)", text, re.MULTILINE), key
    assert tomllib.loads(text) == {"entry": "train.py"}
    # Uncommenting any one setting gives a config gpuflow accepts, with that value.
    for line in text.splitlines():
        match = re.match(r"# ([a-z_]+) = (.+?)\s+#", line)
        if not match:
            continue
        (tmp_path / "gpuflow.toml").write_text(f"{match.group(1)} = {match.group(2)}\n")
        try:
            config = read_project_config(tmp_path)
        except ConfigError as exc:  # noqa: PERF203
            pytest.fail(f"{line!r}: {exc}")
        key = {"cluster": "cluster_name", "name": "cluster_name"}.get(match.group(1), match.group(1))
        assert any(getattr(part, key, None) is not None for part in (config, config.cluster, config.sync, config.jobs, config.recovery)), key


@pytest.mark.parametrize(("files", "expected"), [
    (["train.py", "main.py"], "train.py"),
    (["main.py"], "main.py"),
    (["training/__init__.py", "training/__main__.py", "training/train.py"], "training"),
    (["training/__init__.py", "training/train.py"], "training.train"),
    (["training/__init__.py", "training/fit.py:guard", "training/data.py"], "training.fit"),
    (["training/__init__.py", "training/a.py:guard", "training/b.py:guard"], None),  # which one? ask
    (["training/fit.py:guard"], None),  # not a package
    (["README.md"], None),
])
def test_entry_detection(tmp_path, files, expected):
    for spec in files:
        name, _, guard = spec.partition(":")
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('if __name__ == "__main__":\n    pass\n' if guard else "")
    assert detect_entry(tmp_path) == expected


def test_no_entry_without_a_terminal_is_one_line_saying_to_pass_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gpuflow.cli.init.stdin_is_terminal", lambda: False)
    assert cli(["init"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--entry" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_no_entry_on_a_terminal_asks(tmp_path):
    (tmp_path / "pkg").mkdir()
    asked = []
    report = init_project(tmp_path, ask=lambda question: asked.append(question) or "pkg.fit")
    assert asked and report.entry == "pkg.fit" and report.entry_source is EntrySource.ASKED
    assert read_project_config(tmp_path).jobs.entry == "pkg.fit"


@pytest.mark.parametrize("entry", ["missing.py", "python missing.py --epochs 1", "", 'say "hi"', "a\nb"])
def test_a_bad_entry_is_refused_and_nothing_is_written(tmp_path, entry):
    with pytest.raises(UsageError):
        init_project(tmp_path, entry=entry)
    assert list(tmp_path.iterdir()) == []


def test_the_smoke_test_expects_a_keras_model_only_from_keras_code(tmp_path):
    (tmp_path / "train.py").write_text("import keras\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "plain.py").write_text("print(1)\n")
    init_project(tmp_path, entry="python train.py --epochs 1")
    smoke = (tmp_path / "tests" / "test_gpuflow_smoke.py").read_text()
    assert "EXPECT_KERAS_MODEL = True" in smoke
    compile(smoke, "test_gpuflow_smoke.py", "exec")
    other = tmp_path / "other"
    (other / "pkg").mkdir(parents=True)
    (other / "pkg" / "plain.py").write_text("print(1)\n")
    init_project(other, entry="pkg.plain")
    assert "EXPECT_KERAS_MODEL = False" in (other / "tests" / "test_gpuflow_smoke.py").read_text()


def test_the_workflow_installs_and_runs_pytest_without_secrets(tmp_path):
    (tmp_path / "train.py").write_text("")
    init_project(tmp_path)
    workflow = (tmp_path / ".github" / "workflows" / "gpuflow.yml").read_text()
    assert "gpuflow[sandbox]" in workflow and "python -m pytest" in workflow
    assert "actions/checkout" in workflow and "actions/setup-python" in workflow
    assert "${{ secrets" not in workflow and "AWS_" not in workflow


def test_the_plugin_is_declared_as_a_pytest11_entry_point():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["pytest11"] == {"gpuflow.testing": "gpuflow.testing"}


def test_an_unwritable_place_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "train.py").write_text("")
    (tmp_path / "tests").write_text("a file where init wants a directory\n")
    monkeypatch.chdir(tmp_path)
    assert cli(["init"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write tests/test_gpuflow_smoke.py" in err
    assert "wrote gpuflow.toml, .gpuflowignore" in err
