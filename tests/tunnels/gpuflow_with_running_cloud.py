"""`python -m gpuflow` whose cloud says every instance runs (a recorded sandbox cluster needs no sandbox server).

The tests start this as a process, so that Ctrl-C and SIGTERM reach a real
gpuflow process group; only the cloud's answer is stood in for.
"""

from __future__ import annotations

import sys

from gpuflow import clusters


class RunningCloud:
    def instance_state(self, cluster, instance_id) -> str:
        return "running"

    def console_output(self, cluster, instance_id) -> str:
        return ""


if __name__ == "__main__":  # only the process: a test importing RunningCloud must not change its own gpuflow
    clusters.cloud_probe = lambda provisioner_factory=None: RunningCloud()
    from gpuflow.cli import main

    main(sys.argv[1:])
