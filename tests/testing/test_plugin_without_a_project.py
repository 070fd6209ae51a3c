"""gpuflow.testing, the pytest plugin, in the pytest runs that need no `gpuflow init` project
(tests/testing/test_plugin.py has the one that does): no fixture, no cost; the fixture without
the sandbox extra; pytest-xdist workers.  A file of their own, so that the two xdist workers
of the suite share the plugin's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.testing.test_plugin import REPO, pytest_in

pytestmark = pytest.mark.slow


def test_the_plugin_imports_no_moto_or_boto3_when_no_test_uses_the_fixture(tmp_path):
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    script = textwrap.dedent(f"""
        import sys, pytest
        code = pytest.main(["-p", "gpuflow.testing", "-p", "no:cacheprovider", "-q", {str(tmp_path)!r}])
        heavy = sorted(name for name in ("moto", "boto3", "botocore", "gpuflow.clusters", "gpuflow.jobs",
                                         "gpuflow.testing.sandbox") if name in sys.modules)
        print("RESULT", code, "gpuflow.testing" in sys.modules, heavy)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "RESULT 0 True []" in result.stdout, result.stdout + result.stderr


def test_without_the_sandbox_extra_the_fixture_skips_saying_what_to_install(tmp_path):
    (tmp_path / "conftest.py").write_text("import sys\nsys.modules['moto'] = None  # as if moto were not installed\n")
    (tmp_path / "test_needs_sandbox.py").write_text("def test_it(gpuflow_sandbox):\n    raise AssertionError\n")
    result = pytest_in(tmp_path, "-rs", "--gpuflow-keep")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "pip install 'gpuflow[sandbox]'" in result.stdout


def test_parallel_workers_each_get_their_own_home_and_cloud(tmp_path, tmp_path_factory):
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    (tmp_path / "gpuflow.toml").write_text('entry = "job.py"\n')
    (tmp_path / "job.py").write_text("print('hello')\n")
    (tmp_path / "test_parallel.py").write_text(textwrap.dedent("""
        import json, os
        from pathlib import Path
        import pytest

        @pytest.mark.parametrize("n", [1, 2])
        def test_worker(gpuflow_sandbox, n):
            cluster = gpuflow_sandbox.up("same-name")
            assert gpuflow_sandbox.clusters() == ["same-name"]
            reservations = gpuflow_sandbox.client().describe_instances()["Reservations"]
            assert [i["InstanceId"] for r in reservations for i in r["Instances"]] == [cluster.nodes[0].instance_id]
            assert gpuflow_sandbox.run("job.py").exit_code == 0
            Path(os.environ["SCENARIO_OUT"], f"{n}.json").write_text(json.dumps(
                {"home": str(gpuflow_sandbox.home), "worker": os.environ.get("PYTEST_XDIST_WORKER")}))
            gpuflow_sandbox.down()
    """))
    out = tmp_path / "out"
    out.mkdir()
    result = pytest_in(tmp_path, "-p", "xdist", "-n", "2", "--gpuflow-keep", f"--basetemp={tmp_path_factory.mktemp('inner')}",
                       env={"SCENARIO_OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    facts = [json.loads((out / f"{n}.json").read_text()) for n in (1, 2)]
    assert facts[0]["home"] != facts[1]["home"]
    assert {fact["worker"] for fact in facts} == {"gw0", "gw1"}
    # The workers' fixtures report to the controller's summary; --gpuflow-keep kept both homes.
    assert "gpuflow_sandbox: 2 test(s) checked at teardown" in result.stdout, result.stdout[-3000:]
    for fact in facts:
        assert Path(fact["home"], "state", "clusters").is_dir()
        assert f"gpuflow home kept (--gpuflow-keep): {fact['home']}" in result.stdout
