"""`gpuflow setup --delete --sandbox`: the sandbox server kept running for the account stack
goes with it when it then holds nothing (not after its idle timeout) -- and stays while it
holds anything else (here a key pair); a later delete that finds it empty stops it then."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3

from infra.sandbox import read_server_record, stop_sandbox

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """Running (a zombie, gone but not yet reaped by whoever adopted it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_delete_stops_the_emptied_server_and_keeps_one_that_holds_something(tmp_path):
    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPUFLOW_HOME": str(home)}

    def gpuflow(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "gpuflow", *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    try:
        gpuflow("setup", "--sandbox")
        server = read_server_record(home)
        assert server is not None and _alive(server.pid)  # kept: it holds the stack
        ec2 = boto3.client("ec2", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing")
        ec2.create_key_pair(KeyName="someone-elses")
        gpuflow("setup", "--delete", "--sandbox")
        assert read_server_record(home) == server and _alive(server.pid)  # it still holds a key pair

        ec2.delete_key_pair(KeyName="someone-elses")  # now it holds nothing: the next delete stops it
        assert "nothing to delete" in gpuflow("setup", "--delete", "--sandbox").stdout
        assert read_server_record(home) is None
        assert not _alive(server.pid)
    finally:
        stop_sandbox(home)
