"""How to reach a machine: command runners behind one small protocol.

``base.CommandRunner`` is the protocol; ``local.LocalRunner`` runs in a
directory on this machine (the sandbox), ``ssh.SSHRunner`` reaches an instance
over SSH with pinned host keys.  Only ``ssh`` imports paramiko.
"""
