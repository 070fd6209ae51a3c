"""gpuflow.testing, the pytest plugin, as a user meets it: `gpuflow init` in a fresh directory
outside the repository, then pytest there, in a subprocess (offline: the suite runs in a
loopback-only namespace).  One pytest run carries the generated smoke test and the
scenarios of tests/testing/scenarios.py (each sandbox test costs seconds: they share one).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuflow.procs import identity

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).with_name("scenarios.py")

TRAIN_PY = """\
import json, os, sys
out = os.environ["GPUFLOW_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
print(f"smoke={os.environ.get('GPUFLOW_SMOKE')} args={sys.argv[1:]}")
with open(os.path.join(out, "model.txt"), "w") as handle:
    handle.write("weights")
with open(os.path.join(out, "metrics.json"), "w") as handle:
    json.dump({"accuracy": 0.5, "smoke": os.environ.get("GPUFLOW_SMOKE")}, handle)
code = int(os.environ.get("EXIT_WITH", "0"))
print(f"exiting with {code}")
sys.exit(code)
"""


def cli(argv: list[str]) -> int:
    from gpuflow.cli import app, run_app

    return run_app(app, argv)


def plugin_installed() -> bool:
    """Whether the installed gpuflow declares the pytest11 entry point (else `-p gpuflow.testing`)."""
    return any(entry.value == "gpuflow.testing" for entry in importlib.metadata.entry_points(group="pytest11"))


def pytest_in(directory: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    plugin = [] if plugin_installed() else ["-p", "gpuflow.testing"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pytest", *plugin, "-p", "no:cacheprovider", *args],
        cwd=directory, env=environment, capture_output=True, text=True, timeout=timeout,
    )


@dataclass(frozen=True)
class Outcome:
    passed: bool
    teardown_error: str | None  # the teardown failure's message (the leak report), if any
    call_failure: str | None


def outcomes(junit: Path) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        error = case.find("error")
        failure = case.find("failure")
        skipped = case.find("skipped")
        results[case.get("name")] = Outcome(
            passed=error is None and failure is None and skipped is None,
            teardown_error=None if error is None else (error.text or error.get("message")),
            call_failure=None if failure is None else f"{failure.get('message')}\n{failure.text}",
        )
    return results


@dataclass(frozen=True)
class Session:
    project: Path
    out: Path
    basetemp: Path
    result: subprocess.CompletedProcess
    outcomes: dict[str, Outcome]

    def facts(self, name: str) -> dict:
        return json.loads((self.out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    """`gpuflow init` in a fresh project with a tiny (non-TensorFlow) train.py, the scenarios
    added to its tests, and one pytest run there."""
    project = tmp_path_factory.mktemp("fresh-project")
    (project / "train.py").write_text(TRAIN_PY)
    previous = Path.cwd()
    os.chdir(project)
    try:
        assert cli(["init"]) == 0
    finally:
        os.chdir(previous)
    (project / "tests" / "test_scenarios.py").write_text(SCENARIOS.read_text())
    out = tmp_path_factory.mktemp("scenario-out")
    basetemp = tmp_path_factory.mktemp("inner-basetemp")
    junit = out / "junit.xml"
    result = pytest_in(project, f"--junitxml={junit}", f"--basetemp={basetemp}", "-rA",
                       env={"SCENARIO_OUT": str(out), "AWS_PROFILE": "someone-real", "AWS_ACCESS_KEY_ID": "AKIAREALKEY",
                            "GPUFLOW_OWNER_ID": "ci-shared"})
    return Session(project, out, basetemp, result, outcomes(junit))


def test_gpuflow_init_then_pytest_passes_in_a_fresh_directory(session):
    smoke = session.outcomes["test_training_entry_point_runs_in_the_sandbox"]
    assert smoke.passed, session.result.stdout[-4000:]
    # The teardown check is visible in the run's output.
    assert "gpuflow_sandbox:" in session.result.stdout and "checked at teardown" in session.result.stdout
    # Nothing was left in the project but what init wrote (pulled runs go to the test's directory).
    # (.benchmarks: pytest-benchmark's, where it is installed.)
    assert sorted(path.name for path in session.project.iterdir() if path.name != ".benchmarks") == [
        ".github", ".gpuflowignore", "gpuflow.toml", "tests", "train.py"]


@pytest.mark.parametrize("name", [
    "test_up_run_down_leaves_nothing", "test_a_failing_job_gives_its_exit_code",
    "test_any_spec_spot_in_another_region",
    "test_the_next_test_sees_nothing_of_the_last", "test_kept_home",
])
def test_fixture_scenarios_pass(session, name):
    outcome = session.outcomes[name]
    assert outcome.passed, outcome.call_failure or outcome.teardown_error


@pytest.mark.parametrize(("test", "facts", "kind"), [
    ("test_leak_instance", "instance", "instance"),
    ("test_leak_security_group", "security_group", "security group"),
    ("test_leak_key_pair", "key_pair", "key pair"),
    ("test_leak_sandbox_directory", "sandbox_directory", "sandbox directory"),
    ("test_leak_job_process", "job_process", "job process"),
    ("test_leak_up_without_down_job_still_running", "up_without_down", "instance"),
    ("test_leak_spot_request_in_a_region_the_fixture_never_named", "spot_request", "spot request"),
    ("test_leak_sandbox_server", "sandbox_server", "sandbox server"),
    ("test_leak_launch_template", "launch_template", "launch template"),
    ("test_leak_volume", "volume", "volume"),
])
def test_a_leak_fails_its_test_naming_the_resource(session, test, facts, kind):
    outcome = session.outcomes[test]
    assert outcome.call_failure is None  # the test body itself passed ...
    assert outcome.teardown_error is not None, f"{test} was not failed for its leak"  # ... its teardown did not
    identifier = session.facts(facts)["id"]
    assert f"{kind} {identifier}" in outcome.teardown_error
    assert "Traceback" not in outcome.teardown_error


def test_each_leak_reports_only_its_own_kind(session):
    for test, kind in [("test_leak_security_group", "security group"), ("test_leak_key_pair", "key pair"),
                       ("test_leak_sandbox_server", "sandbox server"), ("test_leak_launch_template", "launch template"),
                       ("test_leak_volume", "volume"),
                       ("test_leak_sandbox_directory", "sandbox directory"), ("test_leak_job_process", "job process")]:
        reported = [line for line in session.outcomes[test].teardown_error.splitlines() if line.strip().startswith("- ")]
        assert len(reported) == 1 and reported[0].strip().startswith(f"- {kind} "), (test, reported)


def test_up_without_down_names_the_whole_cluster(session):
    report = session.outcomes["test_leak_up_without_down_job_still_running"].teardown_error
    assert "instance" in report and "cluster shared" in report
    for kind in ("security group", "key pair", "job process", "sandbox directory"):
        assert f"- {kind} " in report, kind


def test_leaks_are_removed_and_homes_deleted_after_the_run(session):
    assert identity(int(session.facts("job_process")["id"])) is None  # the leaked process was killed
    assert identity(int(session.facts("sandbox_server")["id"])) is None  # the server was stopped
    assert not Path(session.facts("up_without_down")["home"]).exists()
    assert not Path(session.facts("clean")["home"]).exists()
    assert Path(session.facts("clean")["local_dir"], "outputs", "metrics.json").is_file()  # the test's files stay
    survivors = [
        line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        if "time.sleep(300)" in line and "python" in line
    ]
    assert survivors == []


def test_homes_are_private_per_test(session):
    homes = {session.facts(name)["home"] for name in ("clean", "up_without_down", "isolated", "kept")}
    assert len(homes) == 4
    owners = {session.facts(name)["owner"] for name in ("clean", "isolated")}
    assert len(owners) == 2 and "ci-shared" not in owners


def test_gpuflow_keep_keeps_the_home_and_says_where(session):
    kept = Path(session.facts("kept")["home"])
    assert (kept / "state" / "clusters").is_dir()
    assert f"gpuflow home kept (--gpuflow-keep): {kept}" in session.result.stdout
