"""The node's Jupyter port is chosen by probing: when another process takes it before the server binds it (two
`gpuflow notebook` started at once on one node, as two parallel test workers did in CI, or any other program), the
server starts on the next free port instead of failing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

from gpuflow.procs import terminate_base
from gpuflow.tunnels.notebook import node_script

pytest.importorskip("jupyter_server")
pytestmark = pytest.mark.slow

# The node script with its probe lying once: the port it names is the one another process takes just after.
_PROBE_RACED = '''
_probe = _free_port
_raced = []


def _free_port(wanted):
    if not _raced:
        _raced.append(wanted)
        return wanted
    return _probe(wanted)
'''


def test_a_port_taken_between_the_probe_and_the_bind_moves_the_server_to_the_next_free_port(tmp_path):
    thief = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    thief.bind(("127.0.0.1", 0))
    thief.listen(1)
    taken = thief.getsockname()[1]
    end = "\n\nsys.exit(notebook_main"
    script = node_script()
    assert end in script
    script = script.replace(end, _PROBE_RACED + end)
    base = tmp_path / "node"
    token = "f" * 48
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, "start", str(base), str(base / "project"), "notebook", str(taken)],
            input=token, capture_output=True, text=True, timeout=300,
        )
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        assert "error" not in answer, answer
        assert answer["port"] != taken and answer["token"] == token
        request = urllib.request.Request(
            f"http://127.0.0.1:{answer['port']}/api/status", headers={"Authorization": f"token {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # our server, on the port it says
            assert response.status == 200 and "started" in json.loads(response.read())
        settings = json.loads((base / "notebook" / "notebook.json").read_text())
        assert settings["port"] == answer["port"]  # what a reattach reads
    finally:
        thief.close()
        terminate_base(str(base))
