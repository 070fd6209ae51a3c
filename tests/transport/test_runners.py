"""The CommandRunner protocol, the same tests for the local and the SSH runner
(the SSH one against a real OpenSSH server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

from gpuflow.errors import RemoteCommandFailed
from gpuflow.transport.base import CommandRunner
from gpuflow.transport.local import LocalRunner
from gpuflow.transport.ssh import SSHRunner
from tests.transport.conftest import target_for

HOSTILE = ["$(touch pwned)", "`touch pwned`", "; touch pwned", "a && touch pwned", "'quoted\" \\", "*", "~", "new\nline", "ünïcødé ✓", "-n", "", "$HOME"]
PRINT_ARGV = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'x': os.environ.get('GPUFLOW_X')}))"


@pytest.fixture(params=["local", "ssh"])
def runner(request, tmp_path):
    base = tmp_path / "base dir ü"  # a space and unicode in the base path too
    if request.param == "local":
        made: CommandRunner = LocalRunner(base)
    else:
        server = request.getfixturevalue("sshd_session")
        known_hosts = request.getfixturevalue("pinned_known_hosts")
        made = SSHRunner(target_for(server, known_hosts), base_dir=str(base))
    yield made
    made.close()


def test_base_dir_is_absolute_and_exists(runner, tmp_path):
    assert runner.base_dir == str((tmp_path / "base dir ü").resolve())
    assert os.path.isdir(runner.base_dir)


def test_hostile_arguments_arrive_literally(runner):
    result = runner.run([sys.executable, "-c", PRINT_ARGV, *HOSTILE], env={"GPUFLOW_X": "$(touch pwned); 'x'"})
    answer = json.loads(result.stdout)
    assert answer["argv"] == HOSTILE
    assert answer["x"] == "$(touch pwned); 'x'"
    assert answer["cwd"] == runner.base_dir  # commands run in the base directory by default
    assert not any("pwned" in name for name in os.listdir(runner.base_dir))


def test_cwd_stdin_exit_codes_and_scripts(runner):
    subdirectory = os.path.join(runner.base_dir, "sub dir; $(x)")
    os.makedirs(subdirectory)
    result = runner.run([sys.executable, "-c", PRINT_ARGV], cwd=subdirectory)
    assert json.loads(result.stdout)["cwd"] == subdirectory
    echoed = runner.run(["cat"], stdin=b"\x00binary\xffdata" * 50_000)
    assert echoed.stdout == b"\x00binary\xffdata" * 50_000
    failed = runner.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, b"out\n", b"err\n")
    with pytest.raises(RemoteCommandFailed, match="exit code 3"):
        runner.run(["sh", "-c", "exit 3"])
    script = runner.run_script('set -e; printf "%s|" "$GPUFLOW_X" "$(pwd)"', env={"GPUFLOW_X": "a b'c"})
    assert script.stdout.decode() == f"a b'c|{runner.base_dir}|"


def test_put_bytes_read_from_offsets_and_get_file(runner, tmp_path):
    remote = os.path.join(runner.base_dir, "runs", "r 1", "job.log")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    runner.put_bytes(payload, remote, mode=0o640)
    assert oct(os.stat(remote).st_mode & 0o777) == "0o640"
    assert [name for name in os.listdir(os.path.dirname(remote)) if name != "job.log"] == []  # no temp left
    # Resumable reading: chunks from successive offsets rebuild the file exactly.
    received, offset = b"", 0
    while chunk := runner.read_from(remote, offset, limit=1_000_000):
        received += chunk
        offset += len(chunk)
    assert received == payload
    assert runner.read_from(remote, len(payload) + 10) == b""
    assert runner.read_from(remote, 5, 7) == payload[5:12]
    assert runner.read_from(os.path.join(runner.base_dir, "not yet"), 0) == b""
    local = tmp_path / "pulled" / "job.log"
    runner.get_file(remote, str(local))
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(payload).digest()
    runner.put_bytes(b"replaced", remote)
    assert runner.read_from(remote) == b"replaced"
    with pytest.raises(FileNotFoundError):
        runner.get_file(os.path.join(runner.base_dir, "missing"), str(tmp_path / "missing"))
