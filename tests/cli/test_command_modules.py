"""`gpuflow CMD` loads only the command module that registers CMD (typer then builds only its
commands); the table that says which module that is matches what the modules register, and
the help lists every command in the same order whatever was loaded first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer.main

from gpuflow import cli

REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_table_names_the_module_of_every_command_and_group():
    app = cli.app  # every module loaded
    registered = {
        (command.name or typer.main.get_command_name(command.callback.__name__)): command.callback.__module__
        for command in app.registered_commands
    }
    registered.update({group.name: "gpuflow.cli.sandbox" for group in app.registered_groups})
    assert {name: f"gpuflow.cli.{module}" for name, module in cli.MODULE_OF_COMMAND.items()} == registered
    assert set(cli.MODULE_OF_COMMAND.values()) == set(cli.COMMAND_MODULES)


PROBE = """
import json, sys
from gpuflow.cli import COMMAND_MODULES, main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps([code, [name for name in COMMAND_MODULES if f"gpuflow.cli.{name}" in sys.modules]]))
"""


def _loaded(*argv: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    code, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    return code, loaded


def test_a_command_loads_its_module_alone_and_anything_else_loads_all():
    assert _loaded("run", "--help") == (0, ["jobs"])  # was: all nine
    assert _loaded("sandbox", "--help") == (0, ["sandbox"])  # a group
    # Any other first word (--help, --version, a typo whose error suggests from every command): all.
    assert _loaded("bogus")[1] == list(cli.COMMAND_MODULES)


def test_the_help_lists_the_commands_in_one_order_whatever_loaded_first():
    loaded_first = cli.load_commands(("tunnels", "jobs"))
    everything = cli.load_commands()
    assert loaded_first is everything
    modules = [command.callback.__module__.rsplit(".", 1)[1] for command in everything.registered_commands]
    assert modules == sorted(modules, key=cli.COMMAND_MODULES.index) and modules[0] == "demo"
