"""`gpuflow notebook --lab` on a node whose run environment lacks JupyterLab: pip installs it into that interpreter
(the project's `remote_python`, as `gpuflow run` uses), and the server listens on the node's 127.0.0.1 only, in the
synced project directory, its token never in an argv."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from gpuflow import nodes
from gpuflow.procs import identity
from gpuflow.tunnels.notebook import start_notebook, stop_notebook
from tests.tunnels.conftest import INSTANCE_ID
from tests.tunnels.gpuflow_with_running_cloud import RunningCloud

pytest.importorskip("jupyter_server")
pytestmark = pytest.mark.slow


def _offline_jupyterlab_wheel(directory: Path) -> None:
    """A stand-in `jupyterlab` wheel (pip finds no index here): `python -m jupyterlab` runs jupyter_server."""
    directory.mkdir()
    with zipfile.ZipFile(directory / "jupyterlab-0.0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("jupyterlab/__init__.py", "")
        wheel.writestr("jupyterlab/__main__.py", "from jupyter_server.serverapp import main\nmain()\n")
        info = "jupyterlab-0.0.1.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: jupyterlab\nVersion: 0.0.1\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_lab_is_installed_into_the_run_environment_and_served_on_the_node_loopback(
    sandbox_cluster, gpuflow_home, tmp_path, monkeypatch
):
    if importlib_has("jupyterlab"):
        pytest.skip("JupyterLab is installed here: the node would not need to install it")
    # The run environment: an interpreter of its own (this one's packages visible, its own site-packages for pip).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(tmp_path / "env")],
                   check=True)
    python = tmp_path / "env" / "bin" / "python"
    project = tmp_path / "project"
    project.mkdir()
    (project / "gpuflow.toml").write_text(f'remote_python = "{python}"\n')
    _offline_jupyterlab_wheel(tmp_path / "wheels")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))

    runner = nodes.runner_for(sandbox_cluster, probe=RunningCloud(), project_dir=project)
    try:
        server = start_notebook(runner, project_dir=project, lab=True)
        work_dir = f"{runner.base_dir}/project"
    finally:
        runner.close()
    assert server.app == "jupyterlab" and server.note == f"installed jupyterlab into {python}"
    installed = subprocess.run([str(python), "-c", "import jupyterlab; print(jupyterlab.__file__)"],
                               capture_output=True, text=True, check=True).stdout
    assert installed.startswith(str(tmp_path / "env"))  # into the run environment, not the interpreter running gpuflow
    assert Path(os.readlink(f"/proc/{server.pid}/cwd")) == Path(work_dir)  # the synced project directory
    assert Path(os.readlink(f"/proc/{server.pid}/exe")).resolve() == python.resolve()
    assert server.url(9999).startswith("http://127.0.0.1:9999/lab?token=")
    # On the node it answers on 127.0.0.1 only: another address of the same machine is refused.
    base = f"http://127.0.0.1:{server.port}/api/status"
    assert _status(f"{base}?token={server.token}") == 200 and _status(base) == 403
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", server.port), timeout=5):
        pass
    record_dir = gpuflow_home / "sandbox" / "box" / INSTANCE_ID / "notebook"
    assert record_dir.stat().st_mode & 0o777 == 0o700 and (record_dir / "notebook.json").stat().st_mode & 0o777 == 0o600
    assert server.token not in Path(f"/proc/{server.pid}/cmdline").read_text()  # never in an argv

    runner = nodes.runner_for(sandbox_cluster, probe=RunningCloud(), project_dir=project)
    try:
        server_identity = identity(server.pid)
        assert stop_notebook(runner, python=str(python)) == "stopped"
        assert identity(server.pid) != server_identity
    finally:
        runner.close()


def importlib_has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
