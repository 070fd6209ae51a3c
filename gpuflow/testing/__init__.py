"""``gpuflow.testing``: a pytest plugin that runs a project's own training code in the sandbox cloud.

Loaded by pytest through the ``pytest11`` entry point wherever gpuflow is
installed (or with ``-p gpuflow.testing``).  Loading it costs nothing: this
module imports only pytest; gpuflow's use cases, boto3 and moto are imported
when a test asks for the :func:`gpuflow_sandbox` fixture
(:mod:`gpuflow.testing.sandbox`, :mod:`gpuflow.testing.leaks`).

* ``gpuflow_sandbox`` — a private gpuflow home and an in-process sandbox cloud
  (moto) for one test: ``up``, ``run`` (``recover=True``: ``run --recover``),
  ``interrupt``, ``down``, ``client``; at teardown the test fails if anything
  was left (an instance not terminated, a spot request, a security group, a key
  pair, a launch template, an unattached volume, a sandbox directory, a running
  job process, a sandbox server), after removing it.
* ``gpuflow_project_dir`` — the project the fixture runs: the nearest directory
  at or above the test file holding gpuflow.toml, pyproject.toml or .git
  (override the fixture in a conftest.py to choose another).
* ``--gpuflow-keep`` (or ``@pytest.mark.gpuflow_keep``) keeps the gpuflow home
  after the test, for debugging; its path is printed at the end.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KEEP_OPTION = "--gpuflow-keep"
KEEP_MARKER = "gpuflow_keep"
# Where the fixture reports what it checked and kept (read by the terminal summary).
_SUMMARY_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpuflow", "gpuflow sandbox cloud (gpuflow.testing)")
    group.addoption(
        KEEP_OPTION,
        action="store_true",
        default=False,
        help="keep each gpuflow_sandbox test's gpuflow home (state, runs, sandbox directories) and print where",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{KEEP_MARKER}: keep this test's gpuflow_sandbox home after it (like {KEEP_OPTION})"
    )
    config.stash[_SUMMARY_KEY] = {"checked": 0, "kept": []}


@pytest.fixture
def gpuflow_project_dir(request: pytest.FixtureRequest) -> Path:
    """The project ``gpuflow_sandbox`` syncs and runs: the nearest directory at or above
    the test file holding gpuflow.toml, pyproject.toml or .git."""
    from gpuflow.testing.sandbox import project_root

    return project_root(Path(str(request.path)).parent)


@pytest.fixture
def gpuflow_sandbox(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, gpuflow_project_dir: Path
) -> Iterator[Any]:
    """A private gpuflow home and sandbox cloud for this test (see :class:`gpuflow.testing.sandbox.GpuflowSandbox`)."""
    try:
        import moto  # noqa: F401 - the sandbox extra
    except ImportError:
        pytest.skip("gpuflow_sandbox needs gpuflow's sandbox extra: pip install 'gpuflow[sandbox]'")
    from gpuflow.testing.sandbox import LeftBehind, open_sandbox

    keep = bool(request.config.getoption(KEEP_OPTION, default=False)) or (
        request.node.get_closest_marker(KEEP_MARKER) is not None
    )
    summary = request.config.stash.get(_SUMMARY_KEY, {"checked": 0, "kept": []})
    left_behind = None
    try:
        with open_sandbox(
            # A name of its own per test (a deleted home's number would be handed out again).
            home=tmp_path_factory.mktemp(f"gpuflow-home-{_safe_name(request.node.name)}-{secrets.token_hex(3)}"),
            project_dir=gpuflow_project_dir,
            test_id=request.node.nodeid,
            keep=keep,
        ) as sandbox:
            if keep:
                summary["kept"].append((request.node.nodeid, sandbox.home))
            yield sandbox
            # Leaving the block is the teardown check: it removes whatever the test left
            # and raises LeftBehind naming each thing.
    except LeftBehind as leak:
        left_behind = str(leak)
    if left_behind is not None:
        pytest.fail(left_behind, pytrace=False)
    summary["checked"] += 1


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:40].strip("-.") or "test"


_WORKER_OUTPUT_KEY = "gpuflow_sandbox"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker sends what its tests' fixtures checked and kept to the controller,
    whose terminal summary reports the whole session."""
    summary = session.config.stash.get(_SUMMARY_KEY, None)
    workeroutput = getattr(session.config, "workeroutput", None)
    if summary is not None and isinstance(workeroutput, dict):
        workeroutput[_WORKER_OUTPUT_KEY] = {
            "checked": summary["checked"], "kept": [[nodeid, str(home)] for nodeid, home in summary["kept"]]
        }


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """(pytest-xdist controller) a worker finished: add its fixtures' summary to the session's."""
    received = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT_KEY)
    summary = node.config.stash.get(_SUMMARY_KEY, None)
    if summary is None or not isinstance(received, dict):
        return
    summary["checked"] += int(received.get("checked", 0))
    summary["kept"].extend((str(nodeid), Path(home)) for nodeid, home in received.get("kept", ()))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    summary = config.stash.get(_SUMMARY_KEY, None)
    if not summary or not (summary["checked"] or summary["kept"]):
        return
    terminalreporter.write_sep("-", "gpuflow sandbox")
    if summary["checked"]:
        terminalreporter.write_line(
            f"gpuflow_sandbox: {summary['checked']} test(s) checked at teardown; nothing was left in those: "
            "no instance, spot request, security group, key pair, launch template, volume, sandbox directory, "
            "job process or sandbox server"
        )
    for nodeid, home in summary["kept"]:
        terminalreporter.write_line(f"gpuflow home kept ({KEEP_OPTION}): {home}  [{nodeid}]")
