"""The foundation: state store, config, CLI error mapping, loopback sshd, start-up imports."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import subprocess
import sys

import paramiko
import pytest

from gpuflow.config import read_project_config
from gpuflow.errors import ConfigError, StateError, UsageError
from gpuflow.state import StateStore, validate_name
from gpuflow.transport.base import quote_argv
from gpuflow.transport.local import LocalRunner


def _increment(home: str, times: int) -> None:
    store = StateStore(home, "counters")
    for _ in range(times):
        with store.locked():
            document = store.get("shared") or {"value": 0}
            document["value"] += 1
            store.put("shared", document)


def test_state_store_is_atomic_and_locked_across_processes(tmp_path):
    processes = [multiprocessing.Process(target=_increment, args=(str(tmp_path), 50)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert StateStore(tmp_path, "counters").get("shared") == {"value": 200}
    # no temp files left behind
    assert [p.name for p in (tmp_path / "state" / "counters").iterdir() if p.name.endswith(".tmp")] == []


def test_corrupt_state_is_a_clear_error(tmp_path):
    store = StateStore(tmp_path, "clusters")
    store.path("broken").write_text("{not json")
    with pytest.raises(StateError, match=r"broken\.json is damaged \(not JSON"):
        store.get("broken")


@pytest.mark.parametrize("name", ["", "../x", "a b", "-lead", "x" * 64, "a;rm -rf /", "é"])
def test_hostile_names_are_refused(name):
    with pytest.raises(UsageError):
        validate_name(name)


def test_project_config_from_gpuflow_toml_and_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.gpuflow]\ninstance-type = "g6.xlarge"\n')
    assert read_project_config(tmp_path).cluster.instance_type == "g6.xlarge"
    (tmp_path / "gpuflow.toml").write_text('region = "eu-west-1"\n')
    config = read_project_config(tmp_path)
    assert config.cluster.region == "eu-west-1" and config.source.name == "gpuflow.toml"
    (tmp_path / "gpuflow.toml").write_text("region = [")
    with pytest.raises(ConfigError):
        read_project_config(tmp_path)


def test_local_runner_passes_hostile_arguments_literally(tmp_path):
    runner = LocalRunner(tmp_path)
    hostile = ["$(touch pwned)", "; rm -rf /", "a && b", "'quoted\"", "*", "new\nline"]
    result = runner.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *hostile])
    assert json.loads(result.stdout) == hostile
    assert not (tmp_path / "pwned").exists()
    assert quote_argv(["a b"]) == "'a b'"


def test_cli_errors_are_one_line_without_traceback():
    for argv, code in ((["no-such-command"], 2), (["--no-such-option"], 2)):
        completed = subprocess.run([sys.executable, "-m", "gpuflow", *argv], capture_output=True, text=True)
        assert completed.returncode == code
        assert completed.stderr.startswith("gpuflow: error:")
        assert len(completed.stderr.strip().splitlines()) == 1
        assert "Traceback" not in completed.stderr


def test_help_imports_no_heavy_modules():
    probe = (
        "import sys\n"
        "from gpuflow.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('boto3', 'botocore', 'paramiko', 'fabric', 'tensorflow', 'keras', 'moto')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"}
    )
    assert "HEAVY []" in completed.stdout, completed.stdout + completed.stderr


def test_loopback_sshd_accepts_our_key_and_pins_its_host_key(sshd_session):
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key_type, key_body = sshd_session.host_public_key.split()[:2]
    host_key = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_body))
    client.get_host_keys().add(f"[127.0.0.1]:{sshd_session.port}", key_type, host_key)
    client.connect(
        "127.0.0.1",
        port=sshd_session.port,
        username=sshd_session.user,
        key_filename=str(sshd_session.client_key),
        look_for_keys=False,
        allow_agent=False,
    )
    _, stdout, _ = client.exec_command("echo ok")
    assert stdout.read().strip() == b"ok"
    client.close()
