"""Old path of :mod:`gpuflow.jobs` (runs: start, follow, pull, list, stop)."""
# SHIM: removed after the restructure merge

from gpuflow.jobs import *  # noqa: F401,F403
from gpuflow.jobs import __all__ as __all__  # noqa: F401
from gpuflow.jobs import scripts as remote_scripts  # noqa: F401
from gpuflow.jobs.connection import Connection as _Connection  # noqa: F401
from gpuflow.jobs.records import quiet as _quiet  # noqa: F401
from gpuflow.jobs.rundir import lost_reason as _lost_reason  # noqa: F401
from gpuflow.jobs.start import wait_for_start as _wait_for_start  # noqa: F401
