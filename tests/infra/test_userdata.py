"""The user-data that arms the dead-man's switch: valid bash, carries the real
script byte for byte, quotes every value, refuses bad ones, holds no
credentials, fits EC2's 16 KB limit."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from gpuflow.errors import UsageError
from infra.userdata import (
    DEADMAN_BACKSTOP_UNIT_NAME,
    DEADMAN_DEADLINE_PATH,
    DEADMAN_ENV_PATH,
    DEADMAN_INSTALL_PATH,
    DEADMAN_STATUS_PATH,
    USER_DATA_LIMIT_BYTES,
    USER_DATA_MARKER,
    deadman_script,
    installed_deadman_script,
    render_user_data,
)


def _heredoc(user_data: str, delimiter: str) -> str:
    match = re.search(rf"<<'{delimiter}'\n(.*?)\n{delimiter}\n", user_data, re.DOTALL)
    assert match, f"no heredoc {delimiter} in user-data"
    return match.group(1)


def test_user_data_is_valid_bash_and_carries_the_switch_verbatim(tmp_path):
    user_data = render_user_data(cluster_name="exp-1", idle_minutes=45, max_hours=6.5)
    script = tmp_path / "user-data.sh"
    script.write_text(user_data)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert user_data.startswith("#!/bin/bash\n")
    assert USER_DATA_MARKER in user_data
    assert _heredoc(user_data, "GPUFLOW_DEADMAN_SCRIPT_END") == installed_deadman_script().rstrip()
    assert f"ExecStart={DEADMAN_INSTALL_PATH}" in user_data
    assert "Restart=always" in user_data
    assert "systemctl enable --now gpuflow-deadman.service" in user_data
    # Every later boot re-arms the backstop from the persisted deadline; a new
    # instance (even from an image of an old one) starts with no deadline.
    assert f"ExecStart={DEADMAN_INSTALL_PATH} --arm-backstop" in user_data
    assert f"systemctl enable {DEADMAN_BACKSTOP_UNIT_NAME}" in user_data
    assert f"rm -f {DEADMAN_DEADLINE_PATH}" in user_data
    assert "ClientAliveInterval 60" in user_data
    # The independent backstop: ceil(6.5 h) in minutes plus a margin, never earlier than the switch.
    assert "shutdown -h +395 " in user_data


def test_settings_reach_the_switch_exactly(tmp_path):
    user_data = render_user_data(cluster_name="exp-1", idle_minutes=45, max_hours=6.5, ssh_user="ec2-user")
    env_file = tmp_path / "deadman.env"
    env_file.write_text(_heredoc(user_data, "GPUFLOW_DEADMAN_ENV_END") + "\n")
    printed = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; printf "%s|%s|%s|%s|%s" "$GPUFLOW_CLUSTER" "$GPUFLOW_DEADMAN_BASE_DIR" '
         '"$GPUFLOW_DEADMAN_IDLE_MINUTES" "$GPUFLOW_DEADMAN_MAX_HOURS" "$GPUFLOW_DEADMAN_INTERVAL"', "_", str(env_file)],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    assert printed == "exp-1|/home/ec2-user/gpuflow|45|6.5|30"
    assert DEADMAN_ENV_PATH in user_data
    # systemd's EnvironmentFile wants one KEY=VALUE per line.
    for line in env_file.read_text().splitlines():
        assert re.match(r"^[A-Z_]+=\S+$", line), line


def test_the_rendered_switch_settings_are_accepted_by_the_script(tmp_path):
    """The env file the user-data writes must pass deadman.sh's own validation."""
    user_data = render_user_data(cluster_name="exp-1", idle_minutes=1, max_hours=0.25)
    env_file = tmp_path / "deadman.env"
    env_file.write_text(_heredoc(user_data, "GPUFLOW_DEADMAN_ENV_END") + "\n")
    script = tmp_path / "deadman.sh"
    script.write_text(_heredoc(user_data, "GPUFLOW_DEADMAN_SCRIPT_END") + "\n")
    log = tmp_path / "deadman.log"
    # Run it for a moment with a harmless shutdown command; it must start and log its settings.
    process = subprocess.Popen(
        ["bash", "-c", 'set -a; . "$1"; set +a; exec bash "$2" --log-file "$3" --base-dir "$4" --state-file "$5" '
         '--status-file "$6" --deadline-file "$7" --shutdown-command true',
         "_", str(env_file), str(script), str(log), str(tmp_path / "base"), str(tmp_path / "idle-since"),
         str(tmp_path / "status"), str(tmp_path / "deadline")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(100):
            if log.exists() and "start:" in log.read_text():
                break
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        assert "idle=60s max=900s interval=30s" in log.read_text()
    finally:
        process.kill()
        process.wait(timeout=10)
        process.stderr.close()


def test_user_data_fits_the_ec2_limit_with_the_longest_values():
    user_data = render_user_data(
        cluster_name="c" * 63, idle_minutes=10080, max_hours=720.0, ssh_user="u" * 32
    )
    # README states the measured size (14,136 bytes typical, 14,422 with these values); keep room.
    assert len(user_data.encode("utf-8")) < USER_DATA_LIMIT_BYTES - 1024


def test_the_installed_switch_is_the_asset_without_comments(tmp_path):
    """Only comment lines, blank lines and indentation go; every command stays, in order."""
    installed = installed_deadman_script()
    source_commands = [line.strip() for line in deadman_script().splitlines()[1:]
                       if line.strip() and not line.strip().startswith("#")]
    assert installed.splitlines()[1:] == source_commands
    assert installed.startswith("#!/bin/bash\n")
    script = tmp_path / "switch.sh"
    script.write_text(installed)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_gpuflow_reads_the_paths_the_switch_writes():
    """The script's defaults are the paths user-data and `gpuflow status` use."""
    from gpuflow.clusters import switch

    script = deadman_script()
    assert f'status_file="${{GPUFLOW_DEADMAN_STATUS_FILE:-{DEADMAN_STATUS_PATH}}}"' in script
    assert f'deadline_file="${{GPUFLOW_DEADMAN_DEADLINE_FILE:-{DEADMAN_DEADLINE_PATH}}}"' in script
    assert switch.INSTANCE_STATUS_PATH == DEADMAN_STATUS_PATH


def test_no_credentials_in_user_data(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE12")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    user_data = render_user_data(cluster_name="exp-1", idle_minutes=60, max_hours=12)
    for secret in ("AKIAEXAMPLEEXAMPLE12", "wJalrXUtnFEMI", "FwoGZXIvYXdz"):
        assert secret not in user_data
    assert not re.search(r"aws_(secret|access|session)", user_data, re.IGNORECASE)
    assert "BEGIN OPENSSH PRIVATE KEY" not in user_data


@pytest.mark.parametrize(
    "cluster_name",
    ["x; rm -rf /", "$(reboot)", "a'b", "a\nb", "", "-rf", "../etc", "c" * 64],
)
def test_hostile_cluster_names_are_refused(cluster_name):
    with pytest.raises(UsageError):
        render_user_data(cluster_name=cluster_name, idle_minutes=60, max_hours=12)


@pytest.mark.parametrize("ssh_user", ["root;reboot", "$(id)", "Ubuntu", "", "a b", "u" * 33, "../x"])
def test_hostile_ssh_users_are_refused(ssh_user):
    with pytest.raises(UsageError):
        render_user_data(cluster_name="exp-1", idle_minutes=60, max_hours=12, ssh_user=ssh_user)


@pytest.mark.parametrize("idle_minutes", [0, -5, 10081, 1.5, True, "60", None])
def test_bad_idle_minutes_are_refused(idle_minutes):
    with pytest.raises(UsageError, match="idle-minutes"):
        render_user_data(cluster_name="exp-1", idle_minutes=idle_minutes, max_hours=12)


@pytest.mark.parametrize("max_hours", [0, -1, 721, float("nan"), float("inf"), "12", None, False])
def test_bad_max_hours_are_refused(max_hours):
    with pytest.raises(UsageError, match="max-hours"):
        render_user_data(cluster_name="exp-1", idle_minutes=60, max_hours=max_hours)
