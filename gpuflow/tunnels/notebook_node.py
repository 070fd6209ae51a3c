# The node side of `gpuflow notebook`: start, find or stop the cluster's one Jupyter server.
#
# Sent as ``python -c`` after gpuflow.procs' source (standard library only, the
# node's Python 3.8+): ``python -c SCRIPT start|stop|show BASE [WORK_DIR LAB PORT]``;
# the token arrives on stdin (never in an argv another user could read), and
# the answer is one JSON line on stdout.
#
# The server's files live in BASE/notebook/ (mode 0700): ``server.proc`` (PID
# IDENTITY, see gpuflow.procs: a pid alone is never proof), ``notebook.json``
# (port, token, app, work dir; 0600) and ``notebook.log``.  The server leads its
# own session, so it outlives the connection that started it.

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

SETTINGS = "notebook.json"
LOG = "notebook.log"
READY_SECONDS = 120
STOP_GRACE_SECONDS = 10
PORT_ATTEMPTS = 5  # servers that found their probed port taken before they could bind it
_PORT_TAKEN = object()


def _paths(base):
    record_path = os.path.join(base, NOTEBOOK_RECORD)  # gpuflow.procs': what a sandbox termination ends too
    directory = os.path.dirname(record_path)
    return directory, record_path, os.path.join(directory, SETTINGS)


def _running(base):
    """The running server's settings (with its pid), or None."""
    directory, record_path, settings_path = _paths(base)
    pid = proven(record_path)
    if pid is None:
        return None
    try:
        with open(settings_path) as handle:
            settings = json.load(handle)
    except (OSError, ValueError):
        return None
    settings["pid"] = pid
    return settings


def _has(python, module):
    # From "/": a directory named like the module where this runs would be a namespace package, not the module.
    probe = "import importlib.util, sys; spec = importlib.util.find_spec(%r); sys.exit(0 if spec and spec.origin else 1)"
    return subprocess.call(
        [python, "-c", probe % module], cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) == 0


def _app(python, lab):
    """The Jupyter application to run, installing the UI asked for when no Jupyter is there."""
    wanted = "jupyterlab" if lab else "notebook"
    if _has(python, wanted):
        return wanted, None
    if not lab and _has(python, "jupyter_server"):
        return "jupyter_server", "the notebook UI (package `notebook`) is not installed on the node: serving jupyter_server"
    installed = subprocess.call(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wanted],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if installed != 0 or not _has(python, wanted):
        return None, "cannot install %s into %s on the node (pip failed)" % (wanted, python)
    return wanted, "installed %s into %s" % (wanted, python)


def _bindable(port):
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _free_port(wanted):
    for port in range(wanted, min(wanted + 100, 65536)):
        if _bindable(port):
            return port
    return None


def _answers(port, token):
    """Whether OUR server answers on ``port``: its API status, with the token, says
    it started.  A port merely taken (by another process, while the server was
    still to bind it and then fails to) is not a started server."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/api/status", headers={"Authorization": "token " + token})
        response = connection.getresponse()
        body = response.read(65536)
        return response.status == 200 and "started" in json.loads(body.decode("utf-8", "replace"))
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _tail(path, lines=5):
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 8192))
            return [line for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()][-lines:]
    except OSError:
        return []


def start(base, work_dir, lab, wanted_port, token):
    running = _running(base)
    if running is not None:
        running["reattached"] = True
        return running
    directory, record_path, settings_path = _paths(base)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    python = sys.executable
    app, note = _app(python, lab)
    if app is None:
        return {"error": note}
    # The port is chosen by probing, so another process may take it before the
    # server binds it (two notebooks started at once on one node): the server
    # then exits at once and starts again on the next free port.
    port = wanted_port
    for _attempt in range(PORT_ATTEMPTS):
        port = _free_port(port)
        if port is None:
            return {"error": "no free port on the node from %d" % wanted_port}
        answer = _serve(base, work_dir, lab, app, note, port, token)
        if answer is not _PORT_TAKEN:
            return answer
        port += 1
    return {"error": "the ports from %d were each taken before the server could listen (%d tries)"
            % (wanted_port, PORT_ATTEMPTS)}


def _serve(base, work_dir, lab, app, note, port, token):
    """One server on ``port``: its settings once it answers, an error, or
    _PORT_TAKEN when it ended because another process holds that port."""
    directory, record_path, settings_path = _paths(base)
    python = sys.executable
    settings = {"port": port, "token": token, "app": app, "work_dir": work_dir, "lab": bool(lab), "note": note}
    descriptor = os.open(settings_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(settings, handle)
    os.replace(settings_path + ".tmp", settings_path)
    log_path = os.path.join(directory, LOG)
    log_start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    argv = [
        python, "-m", app, "--no-browser", "--ServerApp.ip=127.0.0.1", "--ServerApp.port=%d" % port,
        "--ServerApp.port_retries=0", "--ServerApp.root_dir=%s" % work_dir,
    ]
    if os.geteuid() == 0:  # a node where gpuflow logs in as root (the sandbox in CI): it is that user's server
        argv.append("--ServerApp.allow_root=True")
    child = os.fork()
    if child == 0:  # the server: its own session, its files for output, its identity recorded before exec
        try:
            os.setsid()
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(work_dir)
            os.environ["JUPYTER_TOKEN"] = token
            os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(directory, "runtime")  # its cookie secret, kernels' files
            record(record_path, os.getpid())
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        done, _status = os.waitpid(child, os.WNOHANG)
        if done:
            if _port_taken(port, log_path, log_start):
                return _PORT_TAKEN
            return {"error": "the Jupyter server exited: %s" % " | ".join(_tail(log_path)), "log": log_path}
        if _answers(port, token):
            settings.update(pid=child, reattached=False)
            return settings
        time.sleep(0.1)
    os.killpg(child, signal.SIGKILL)
    return {"error": "the Jupyter server did not listen within %d s: %s" % (READY_SECONDS, " | ".join(_tail(log_path)))}


def _port_taken(port, log_path, log_start):
    """Whether a server that ended did so because ``port`` was another's: the
    port is held now, or its log (this attempt's part) says it was in use."""
    if not _bindable(port):
        return True
    try:
        with open(log_path, "rb") as handle:
            handle.seek(log_start)
            return b"already in use" in handle.read(1 << 20)
    except OSError:
        return False


def stop_server(base):
    directory, record_path, settings_path = _paths(base)
    pid = proven(record_path)
    outcome = "none"
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        outcome = "stopped"
        while proven(record_path) is not None:
            if time.monotonic() >= deadline:
                os.killpg(pid, signal.SIGKILL)
                outcome = "killed"
                break
            time.sleep(0.1)
    for path in (record_path, settings_path):
        try:
            os.unlink(path)
        except OSError:
            pass
    return {"stopped": outcome, "pid": pid}


def notebook_main(argv):
    mode, base = argv[0], argv[1]
    if mode == "start":
        token = sys.stdin.read().strip()
        answer = start(base, argv[2], argv[3] == "lab", int(argv[4]), token)
    elif mode == "stop":
        answer = stop_server(base)
    else:
        answer = {"running": _running(base)}
    sys.stdout.write(json.dumps(answer) + "\n")
    return 1 if "error" in answer else 0
