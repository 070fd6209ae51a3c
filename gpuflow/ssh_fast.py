"""`gpuflow ssh NAME [-- CMD...]` without the CLI machinery, for its common case.

``gpuflow ssh NAME -- true`` should cost little more than ``ssh host true``:
the full CLI imports typer and every command module, and reading a cluster
through the cluster use cases imports boto3.  When the command line is exactly
``ssh NAME`` or ``ssh NAME -- CMD...`` and NAME is a live cloud cluster (not
the sandbox) whose head node's host keys are already pinned, this module reads
the record and execs the very command line :func:`gpuflow.nodes.ssh_invocation`
builds, as the full command would.  In every other case (an option, a sandbox
cluster, no pinned key yet, an unknown or damaged record, any error) it returns
and the full CLI runs, with its checks and its one-line errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from gpuflow import nodes
from gpuflow.config import gpuflow_home
from gpuflow.records import Cluster
from gpuflow.state import StateStore, validate_name
from gpuflow.transport import hostkeys


def exec_if_simple(argv: Sequence[str]) -> None:
    """Exec ``ssh`` for ``argv`` (the arguments after ``gpuflow``) when it is the
    simple case; return otherwise."""
    if len(argv) < 2 or argv[0] != "ssh" or argv[1].startswith("-"):
        return
    if len(argv) > 2 and (argv[2] != "--" or len(argv) == 3):
        return  # options, or `--` with nothing after it: the full CLI says what it means
    name, command = argv[1], list(argv[3:])
    try:
        invocation = _invocation(name, command)
    except Exception:  # noqa: BLE001 - the full CLI repeats the work and reports it properly
        return
    if invocation is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(invocation.argv[0], list(invocation.argv))
    except OSError:
        return  # no ssh: the full CLI says so


def _invocation(name: str, command: list[str]) -> nodes.Invocation | None:
    document = StateStore(gpuflow_home(), "clusters").get(validate_name(name, "cluster name"))
    if not isinstance(document, dict) or document.get("phase", "up") != "up":
        return None
    cluster = Cluster.from_dict(document)
    if cluster.sandbox or not cluster.nodes:
        return None
    target = nodes.ssh_target_for(cluster)
    if not hostkeys.pinned_keys(str(target.known_hosts_path), target.host, target.port):
        return None  # the keys come from the console: the full command asks the cloud
    return nodes.ssh_invocation(cluster, command or None)
