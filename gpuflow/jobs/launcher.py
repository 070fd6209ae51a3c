"""The start's one Python process on the node: write the run's files, launch its supervisor.

:func:`gpuflow.jobs.scripts.start_script` (and the resume's script) run it as
``python -I -S -c SCRIPT [--unpack] RUN_DIR SUPERVISOR`` where SCRIPT is
:mod:`gpuflow.procs`' source followed by this module's (see
:func:`gpuflow.jobs.scripts.launcher_script`).  Standard library only, nothing
imported from gpuflow, runnable by the Python 3.8+ of an instance.

It does in one interpreter what took two before (an unpacker, then the
supervisor starting ``python`` again only to record its own identity):

1. with ``--unpack``, the files stdin carries (:func:`gpuflow.jobs.scripts.start_files_payload`:
   per file a header line ``NAME MODE SIZE``, mode in octal, then SIZE bytes; an empty line
   ends) are written into RUN_DIR, each atomically (a temporary name opened with
   ``O_NOFOLLOW``, its mode, a rename); a name is one path component;
2. it forks, as ``setsid -f nohup`` does: the child leads a new session, claims the run
   directory (``mkdir .supervisor``: a repeated launch finds the claim and leaves, as the
   supervisor's own claim does), records its identity in ``supervisor.proc``
   (:func:`gpuflow.procs.record`: pid and start time, which stay the same across ``exec``),
   ignores SIGHUP, puts ``/dev/null`` on its standard streams and execs ``bash SUPERVISOR
   claimed``: the supervisor, told that its claim and its record are made, writes its pid
   next.  The parent returns at once.
"""

from __future__ import annotations

import os
import signal
import sys

CLAIM = ".supervisor"  # the supervisor's claim on its run directory, made once
CLAIMED = "claimed"  # the supervisor's argument: its claim and identity record are made


def unpack_files(run_dir: str, stream) -> None:
    """Write the files ``stream`` carries into ``run_dir`` (created), each atomically with its mode."""
    os.makedirs(run_dir, exist_ok=True)
    while True:
        header = stream.readline()
        if not header.strip():
            return
        name, mode, size = header.decode("utf-8").split(" ")
        size = int(size)
        if not name or "/" in name or name in (".", ".."):
            sys.exit("gpuflow-start: bad file name %r" % name)
        body = stream.read(size)
        if len(body) != size:
            sys.exit("gpuflow-start: %s arrived truncated" % name)
        temporary = os.path.join(run_dir, ".%s.%d.tmp" % (name, os.getpid()))
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(handle, "wb") as out:
            out.write(body)
        os.chmod(temporary, int(mode, 8))
        os.replace(temporary, os.path.join(run_dir, name))


def launch_supervisor(run_dir: str, script: str, record_supervisor) -> None:
    """Start ``bash SCRIPT claimed`` in ``run_dir``, detached (its own session, SIGHUP ignored,
    no stream of this process), its claim made and its identity recorded before it runs
    (``record_supervisor(pid)``, in ``run_dir``: :func:`gpuflow.procs.record` of
    ``supervisor.proc``); returns at once in the caller."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        return
    try:  # the child: never returns into the caller's code
        os.setsid()
        os.chdir(run_dir)
        try:
            os.mkdir(CLAIM)
        except OSError:  # claimed already: a repeated launch leaves
            os._exit(0)
        record_supervisor(os.getpid())
        null = os.open(os.devnull, os.O_RDWR)
        for descriptor in (0, 1, 2):
            os.dup2(null, descriptor)
        if null > 2:
            os.close(null)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        for name in ("SIGPIPE", "SIGXFSZ"):  # Python ignores these; bash and what it starts get the defaults
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.execvp("bash", ["bash", script, CLAIMED])
    finally:
        os._exit(127)


def launch_main(argv: list, record_supervisor) -> int:
    """``[--unpack] RUN_DIR SUPERVISOR``: the start's entry (``record_supervisor(pid)`` records the
    supervisor's identity, relative to the run directory: see :func:`launch_supervisor`)."""
    unpack = argv[:1] == ["--unpack"]
    if unpack:
        argv = argv[1:]
    run_dir, script = argv
    if unpack:
        unpack_files(run_dir, sys.stdin.buffer)
    launch_supervisor(run_dir, script, record_supervisor)
    return 0
