"""Old path of :mod:`gpuflow.jobs.demo` (``gpuflow demo``)."""
# SHIM: removed after the restructure merge

from gpuflow.jobs.demo import *  # noqa: F401,F403
from gpuflow.jobs.demo import DEMO_EPOCHS, DEMO_MODULE, DemoSummary, demo_project_dir, run_demo  # noqa: F401
