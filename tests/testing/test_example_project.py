"""examples/digits-classifier is what `gpuflow init` writes today (its files are not left behind
when init learns a setting), a user's own script, and collected by the project's test command.
No sandbox, no TensorFlow: its smoke test itself runs with the suite (testpaths)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gpuflow import project_init
from gpuflow.config import read_project_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits-classifier"
ENTRY = "python fit.py --hidden-units 32"


def test_the_example_holds_exactly_what_init_writes_for_its_entry():
    assert read_project_config(EXAMPLE).jobs.entry == ENTRY
    assert (EXAMPLE / "gpuflow.toml").read_text() == project_init.config_text(ENTRY)
    assert (EXAMPLE / project_init.IGNORE_NAME).read_text() == project_init.IGNORE_TEXT
    assert (EXAMPLE / project_init.WORKFLOW_PATH).read_text() == project_init.WORKFLOW_TEXT
    # The smoke test: init's, plus the import skips its README says were added by hand.
    smoke = (EXAMPLE / project_init.SMOKE_TEST_PATH).read_text()
    added = re.search(r"\n# \(Added to what `gpuflow init` wrote.*?\n\n", smoke, re.DOTALL)
    assert added is not None
    assert smoke.replace(added.group(0)[:-1], "", 1) == project_init.smoke_test_text(expect_keras_model=True)


def test_the_example_is_a_users_own_script_with_a_five_line_readme():
    fit = (EXAMPLE / "fit.py").read_text()
    assert "--n-epochs" in fit and "--save-to" in fit and "GPUFLOW_OUTPUT_DIR" in fit and "GPUFLOW_SMOKE" in fit
    assert "training" not in {line.split()[1] for line in fit.splitlines() if line.startswith(("import ", "from "))}
    assert len([line for line in (EXAMPLE / "README.md").read_text().splitlines() if line.strip()]) <= 5


def test_the_projects_test_command_collects_the_example():
    pytest_options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "examples" in pytest_options["testpaths"]
    assert "pytest" in (REPO / ".ci" / "run").read_text()
    assert not re.search(r"pytest[^\n]*(--ignore|\btests/)", (REPO / ".ci" / "run").read_text())
