"""Reaching servers on a cluster's node from this machine, with no port opened to anyone.

* :mod:`gpuflow.tunnels.ports` — ``REMOTE[:LOCAL]`` specs and the free local port;
* :mod:`gpuflow.tunnels.forward` — `gpuflow forward`: the system ``ssh -L``
  (the same pinned options as `gpuflow ssh`) supervised and restarted when the
  connection drops, or a local relay for a sandbox node without sshd;
* :mod:`gpuflow.tunnels.registry` — the forwards open on this machine (for
  `gpuflow status`), each recorded with its process identity.

A use-case package: the CLI imports it inside its commands.
"""
