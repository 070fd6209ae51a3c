"""The EC2 user-data that arms an instance's dead-man's switch at first boot.

``render_user_data`` returns a bash script (cloud-init runs ``#!`` user-data
as root, once) that

1. installs ``infra/assets/deadman.sh`` as ``/usr/local/sbin/gpuflow-deadman``,
2. writes its settings to ``/etc/gpuflow/deadman.env``,
3. runs it as a systemd service that restarts on any exit (``nohup`` where
   there is no systemd),
4. schedules ``shutdown -h +<max-hours>`` as a second, independent hour cap
   in case the switch itself cannot run at all, and a oneshot unit that
   re-arms it at every later boot from the persisted deadline,
5. creates the gpuflow base directory owned by the login user.

The switch's rules, and why it is built the way it is, are in the script's
header and in the README ("The dead-man's switch").

The instance is launched with InstanceInitiatedShutdownBehavior=terminate, so
every shutdown here is a termination: nothing keeps billing.

Every value is validated here and shell-quoted when rendered, and the script
carries no credentials (the test suite checks both).  EC2 refuses user-data
over 16 KB (before base64), so the size is checked too.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from infra.common import validate_name
from infra.errors import UsageError

USER_DATA_LIMIT_BYTES = 16 * 1024
DEADMAN_ASSET = Path(__file__).with_name("assets") / "deadman.sh"
DEADMAN_INSTALL_PATH = "/usr/local/sbin/gpuflow-deadman"
DEADMAN_ENV_PATH = "/etc/gpuflow/deadman.env"
DEADMAN_LOG_PATH = "/var/log/gpuflow-deadman.log"
DEADMAN_UNIT_NAME = "gpuflow-deadman.service"
DEADMAN_BACKSTOP_UNIT_NAME = "gpuflow-deadman-backstop.service"
# Where the switch keeps the max-hours deadline (survives reboots) and writes its
# verdict for `gpuflow status` (the script's defaults; a test checks they agree).
DEADMAN_DEADLINE_PATH = "/var/lib/gpuflow/deadline"
DEADMAN_STATUS_PATH = "/run/gpuflow/deadman.status"
# Marker the provisioning tests (and `gpuflow status`) can look for in user-data.
USER_DATA_MARKER = "# gpuflow dead-man's switch"

MAX_IDLE_MINUTES = 7 * 24 * 60
MAX_MAX_HOURS = 30 * 24.0
_SSH_USER_PATTERN = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HEREDOC_DELIMITER = "GPUFLOW_DEADMAN_SCRIPT_END"


def validate_idle_minutes(idle_minutes: int) -> int:
    if isinstance(idle_minutes, bool) or not isinstance(idle_minutes, int):
        raise UsageError(f"--idle-minutes must be a whole number of minutes, got {idle_minutes!r}")
    if not 1 <= idle_minutes <= MAX_IDLE_MINUTES:
        raise UsageError(
            f"--idle-minutes must be between 1 and {MAX_IDLE_MINUTES}, got {idle_minutes}",
            hint="it is how long an instance may sit without a job or a connection before it terminates itself",
        )
    return idle_minutes


def validate_max_hours(max_hours: float) -> float:
    if isinstance(max_hours, bool) or not isinstance(max_hours, (int, float)) or not math.isfinite(max_hours):
        raise UsageError(f"--max-hours must be a number of hours, got {max_hours!r}")
    if not 0 < max_hours <= MAX_MAX_HOURS:
        raise UsageError(
            f"--max-hours must be above 0 and at most {MAX_MAX_HOURS:g}, got {max_hours:g}",
            hint="it is the hard cap after which an instance terminates itself even while a job runs",
        )
    return float(max_hours)


def validate_ssh_user(ssh_user: str) -> str:
    if not isinstance(ssh_user, str) or not _SSH_USER_PATTERN.match(ssh_user):
        raise UsageError(f"invalid SSH user name {ssh_user!r}", hint="use a plain Linux login name such as 'ubuntu'")
    return ssh_user


def deadman_script() -> str:
    """The dead-man's switch script shipped with the package."""
    return DEADMAN_ASSET.read_text(encoding="utf-8")


def installed_deadman_script() -> str:
    """The switch as the user-data installs it: the asset without its comment
    lines, blank lines and indentation (EC2 refuses user-data over 16 KB; the
    comments are for people reading the asset).  The script has no heredocs or
    multi-line strings, so this changes no command; the switch's tests run
    exactly this text."""
    lines = deadman_script().splitlines()
    kept = [lines[0]]  # the #! line
    for line in lines[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            kept.append(stripped)
    return "\n".join(kept) + "\n"


def render_user_data(*, cluster_name: str, idle_minutes: int, max_hours: float, ssh_user: str = "ubuntu") -> str:
    """The user-data script for one instance of ``cluster_name``.

    Raises :class:`~infra.errors.UsageError` for a bad value, before
    anything is launched.
    """
    validate_name(cluster_name, "cluster name")
    validate_idle_minutes(idle_minutes)
    validate_max_hours(max_hours)
    validate_ssh_user(ssh_user)

    script = installed_deadman_script()
    if _HEREDOC_DELIMITER in script:  # pragma: no cover - guards against editing the asset carelessly
        raise RuntimeError("the dead-man's switch script contains its own heredoc delimiter")

    base_dir = f"/home/{ssh_user}/gpuflow"
    # shutdown(8) takes whole minutes; round up so this backstop never fires
    # before the switch's own (second-accurate) cap.
    backstop_minutes = math.ceil(max_hours * 60) + 5
    settings = {
        "GPUFLOW_CLUSTER": cluster_name,
        "GPUFLOW_DEADMAN_BASE_DIR": base_dir,
        "GPUFLOW_DEADMAN_IDLE_MINUTES": str(idle_minutes),
        "GPUFLOW_DEADMAN_MAX_HOURS": repr(float(max_hours)),
        "GPUFLOW_DEADMAN_INTERVAL": "30",
        "GPUFLOW_DEADMAN_LOG_FILE": DEADMAN_LOG_PATH,
    }
    # systemd's EnvironmentFile accepts shell-like quoting; so does `.` in bash.
    env_lines = "\n".join(f"{key}={shlex.quote(value)}" for key, value in settings.items())
    q = shlex.quote

    user_data = f"""#!/bin/bash
{USER_DATA_MARKER} (cluster {cluster_name}): terminate after {idle_minutes} idle minutes, at most {max_hours:g} hours.
# Runs once as root at first boot (cloud-init). No credentials in here.
set -u
umask 022

install -d -m 0755 /etc/gpuflow /usr/local/sbin
cat > {q(DEADMAN_INSTALL_PATH)} <<'{_HEREDOC_DELIMITER}'
{script.rstrip()}
{_HEREDOC_DELIMITER}
chmod 0755 {q(DEADMAN_INSTALL_PATH)}

cat > {q(DEADMAN_ENV_PATH)} <<'GPUFLOW_DEADMAN_ENV_END'
{env_lines}
GPUFLOW_DEADMAN_ENV_END
chmod 0644 {q(DEADMAN_ENV_PATH)}

# The gpuflow directory the jobs and heartbeats live in, owned by the login user
# (cloud-init made that user before running this; if not, gpuflow creates it on
# first connection, and until then the switch simply sees no job).
if id -u {q(ssh_user)} >/dev/null 2>&1; then
    install -d -m 0755 -o {q(ssh_user)} -g "$(id -gn {q(ssh_user)})" {q(base_dir)} {q(base_dir + "/runs")}
fi

# Backstop hour cap, independent of the switch: if it could never start, this still ends the instance.
shutdown -h +{backstop_minutes} 'gpuflow: max-hours cap reached' >/dev/null 2>&1 || true
# A new instance (even from an image of an old one) gets a new deadline; the switch writes it.
rm -f {q(DEADMAN_DEADLINE_PATH)}
# An SSH session counts as busy: let sshd drop one whose client vanished (~5 min).
if [ -d /etc/ssh/sshd_config.d ]; then
    printf 'ClientAliveInterval 60\\nClientAliveCountMax 5\\n' > /etc/ssh/sshd_config.d/60-gpuflow.conf
    systemctl reload ssh >/dev/null 2>&1 || systemctl reload sshd >/dev/null 2>&1 || true
fi

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    cat > /etc/systemd/system/{DEADMAN_UNIT_NAME} <<'GPUFLOW_DEADMAN_UNIT_END'
[Unit]
Description=gpuflow dead-man's switch (terminates this instance when idle or past its hour cap)
After=network.target

[Service]
Type=simple
EnvironmentFile={DEADMAN_ENV_PATH}
ExecStart={DEADMAN_INSTALL_PATH}
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
GPUFLOW_DEADMAN_UNIT_END
    # At every later boot: re-arm the backstop from the persisted deadline.
    cat > /etc/systemd/system/{DEADMAN_BACKSTOP_UNIT_NAME} <<'GPUFLOW_DEADMAN_UNIT_END'
[Unit]
Description=gpuflow: re-arm the max-hours backstop (shutdown -h at the deadline)

[Service]
Type=oneshot
EnvironmentFile={DEADMAN_ENV_PATH}
ExecStart={DEADMAN_INSTALL_PATH} --arm-backstop

[Install]
WantedBy=multi-user.target
GPUFLOW_DEADMAN_UNIT_END
    systemctl daemon-reload
    systemctl enable {DEADMAN_BACKSTOP_UNIT_NAME}
    systemctl enable --now {DEADMAN_UNIT_NAME}
else
    (set -a; . {q(DEADMAN_ENV_PATH)}; set +a
     nohup setsid {q(DEADMAN_INSTALL_PATH)} >>{q(DEADMAN_LOG_PATH)} 2>&1 < /dev/null &)
fi
echo "gpuflow: dead-man's switch armed (idle {idle_minutes} min, cap {max_hours:g} h)"
"""
    size = len(user_data.encode("utf-8"))
    if size > USER_DATA_LIMIT_BYTES:  # pragma: no cover - a test keeps the asset small
        raise RuntimeError(f"user-data is {size} bytes, over EC2's {USER_DATA_LIMIT_BYTES}-byte limit")
    return user_data
