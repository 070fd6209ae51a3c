"""Old path of :mod:`gpuflow.jobs.scripts` (the scripts a job runs on the instance)."""
# SHIM: removed after the restructure merge

from gpuflow.jobs.scripts import *  # noqa: F401,F403
from gpuflow.jobs.scripts import (  # noqa: F401
    ENVIRONMENT_PROBE_PY,
    KEPT_AWS_VARIABLES,
    LIST_TREE_PY,
    RUN_STATUS_PY,
    STOP_JOB_PY,
    job_command,
    launch_command,
    procs_script,
    render_supervisor,
    wait_for_start_command,
)
