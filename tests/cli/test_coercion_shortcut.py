"""`gpuflow run` parses its command line without pydantic, to the same values typer's own coercion gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer.main
from typer._coercion import build_runtime_param

from gpuflow.cli import _coercion, app

ROOT = Path(__file__).resolve().parents[2]

SAMPLES = (None, "x", "it's $(touch pwned)", "", ("a", "b"), ["-c", "print(1)"], (), 3, b"raw", ("a", 1))


def test_every_shortcut_gives_what_typer_would(monkeypatch):
    command = typer.main.get_command(app)
    ctx = command.context_class(command)  # typer's own (vendored) click
    checked = 0
    for name in ("run", "logs", "pull", "stop", "sync", "up"):
        sub = command.commands.get(name)
        if sub is None:
            continue
        for param in sub.params:
            if not hasattr(param, "type_descriptor"):
                continue
            for value in SAMPLES:
                known = _coercion.shortcut(param, value)
                if known is _coercion._NO_SHORTCUT:
                    continue
                real = build_runtime_param(param.type_descriptor).coerce(value, param=param, ctx=ctx)
                assert (type(known), known) == (type(real), real), (name, param.name, value)
                checked += 1
    assert checked > 20


def test_a_run_command_line_is_parsed_without_pydantic(tmp_path):
    probe = (
        "import sys\n"
        "sys.argv = ['gpuflow', 'run', 'nosuch', '--env', 'A=1', '--', 'python', '-c', 'print(1)']\n"
        "from gpuflow.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print(exc.code, 'pydantic' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUFLOW_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert "no cluster named 'nosuch'" in result.stderr
    assert result.stdout.split()[-2:] == ["4", "False"], result.stdout + result.stderr
