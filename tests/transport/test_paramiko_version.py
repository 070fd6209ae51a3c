"""Connecting imports paramiko without importlib.metadata (and the email parser it brings):
paramiko asks it only for its own version, which its installed dist-info's name says; that
version is the one paramiko reports, and importlib.metadata works as ever afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from gpuflow.transport.ssh import _import_paramiko
paramiko = _import_paramiko()
loaded = sorted(name for name in ("importlib.metadata", "email.parser") if name in sys.modules)
from importlib import metadata
print(json.dumps([loaded, paramiko.__version__, metadata.version("paramiko"), type(metadata.version("pip")).__name__]))
"""


def test_paramiko_is_imported_without_importlib_metadata_and_reports_its_version():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded, reported, installed, other = json.loads(done.stdout)
    assert loaded == []  # was: both, for paramiko's `metadata.version("paramiko")`
    assert reported == installed and other == "str"
