"""Connecting imports paramiko without the optional `invoke` its ssh_config module tries
(unittest.mock and a YAML parser, ~50 ms of every command that connects), and leaves
`invoke` importable for anyone else."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from gpuflow.records import SSHTarget
from gpuflow.transport.ssh import SSHRunner
runner = SSHRunner(SSHTarget(host="127.0.0.1", port=int(sys.argv[1]), user="nobody"), connect_timeout=2)
try:
    runner._open_client()  # nothing listens there: refused at once, after paramiko is imported
except Exception as exc:
    failed = type(exc).__name__
loaded = sorted(name for name in ("paramiko", "invoke", "unittest.mock") if name in sys.modules)
try:
    import invoke  # noqa: F401
    importable = True
except ImportError:
    importable = False
print(json.dumps([failed, loaded, importable]))
"""


def test_connecting_imports_paramiko_without_invoke():
    pytest.importorskip("invoke")  # where it is not installed there is nothing to skip
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        done = subprocess.run([sys.executable, "-c", PROBE, str(port)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert done.returncode == 0, done.stderr[-2000:]
    failed, loaded, importable = json.loads(done.stdout)
    assert failed and loaded == ["paramiko"] and importable
