"""The `gpuflow` command (the console script and `python -m gpuflow`).

`gpuflow ssh NAME [-- CMD]` in its common case execs ssh before the CLI is
even imported (:mod:`gpuflow.ssh_fast`); everything else is the CLI's.
"""

import sys


def main() -> None:
    if sys.argv[1:2] == ["ssh"]:
        from gpuflow.ssh_fast import exec_if_simple

        exec_if_simple(sys.argv[1:])  # returns unless it execs
    from gpuflow.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
