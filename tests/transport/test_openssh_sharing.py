"""`gpuflow ssh` shares one authenticated OpenSSH connection per node across commands
(ControlMaster=auto + ControlPersist): a second command makes no new login, the fast path
and the full command ride the same master, a node of another identity never reuses it,
teardown leaves no master, and a dead master or a stale socket costs only a new login.

Logins are counted in a loopback sshd's log (``Accepted`` lines, LogLevel INFO), as
bench/roundtrip_bench.py counts them; every gpuflow command runs as a fresh process."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from gpuflow import clusters, nodes
from gpuflow.config import gpuflow_home
from gpuflow.records import Node, SSHTarget
from gpuflow.ssh_fast import fast_argv
from gpuflow.state import StateStore
from gpuflow.transport import hostkeys, openssh
from tests.infra.cloud import cloud, provisioners  # noqa: F401 - fixtures
from tests.sshd import SshServer
from tests.test_nodes import make_cluster
from tests.waiting import wait_for

pytestmark = pytest.mark.ssh

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharing-sshd")
    (directory / "remote-home").mkdir()
    started = SshServer(directory / "sshd", extra_config=(f"SetEnv HOME={directory / 'remote-home'}",),
                        log_level="INFO").start()
    yield started
    started.stop()


def _logins(server: SshServer) -> int:
    return server.log.read_text(errors="replace").count("Accepted ")


def _gpuflow(*argv: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuflow", *argv], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPOSITORY), **environment})


def _pin(cluster, server) -> None:
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", server.port,
                           [hostkeys.parse_public_key(server.host_public_key)])


@pytest.fixture
def cluster(server, gpuflow_home):
    made = make_cluster(server, "mx")
    _pin(made, server)
    return made


def _master_pid(socket_path: str) -> int | None:
    """The pid of the master listening on ``socket_path`` (``ssh -O check``), None when none answers."""
    done = subprocess.run(["ssh", "-F", "none", "-o", f"ControlPath={socket_path}", "-O", "check", "x"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or "pid=" not in done.stderr:
        return None
    return int(done.stderr.split("pid=", 1)[1].split(")", 1)[0])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _socket(home: Path) -> str:
    [path] = openssh.master_sockets(str(home))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    return path


def test_a_second_gpuflow_ssh_makes_no_new_login_and_returns_the_commands_output_and_status(server, cluster,
                                                                                            gpuflow_home):
    before = _logins(server)
    first = _gpuflow("ssh", "mx", "--", "sh", "-c", "echo first; exit 3")
    assert (first.returncode, first.stdout) == (3, "first\n"), first.stderr
    assert _logins(server) == before + 1
    path = _socket(gpuflow_home)
    assert _master_pid(path)  # the master outlives the command
    assert stat.S_IMODE(os.stat(Path(path).parent).st_mode) == 0o700
    second = _gpuflow("ssh", "mx", "--", "sh", "-c", "echo second >&2; echo out; exit 5")
    assert (second.returncode, second.stdout, second.stderr) == (5, "out\n", "second\n")
    assert _logins(server) == before + 1  # rode the first command's connection
    # The full command (here for an option the fast path leaves to it) rides the same master.
    full = _gpuflow("ssh", "mx", "--trust-on-first-use", "--", "echo", "full")
    assert (full.returncode, full.stdout) == (0, "full\n"), full.stderr
    assert _logins(server) == before + 1
    assert openssh.master_sockets(str(gpuflow_home)) == [path]


def test_commands_started_together_make_one_connection_and_print_nothing_of_it(server, cluster, gpuflow_home):
    before = _logins(server)
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    started = [subprocess.Popen([sys.executable, "-m", "gpuflow", "ssh", "mx", *option, "--", "echo", str(index)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, env=environment)
               for index, option in enumerate([[], [], ["--trust-on-first-use"]])]
    results = [(process.wait(timeout=120), process.stdout.read(), process.stderr.read()) for process in started]
    assert results == [(0, f"{index}\n", "") for index in range(3)]  # no "ControlSocket ... already exists"
    assert _logins(server) == before + 1


def _ssh_logging_to(directory: Path) -> dict[str, str]:
    """An environment whose PATH finds an ``ssh`` that appends its arguments to
    ``directory/calls`` (one line per process) and execs the real one."""
    real = shutil.which("ssh")
    wrapper = directory / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {directory / "calls"}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return {"PATH": f"{wrapper.parent}:{os.environ['PATH']}"}


def test_the_first_command_is_one_ssh_that_becomes_the_master(server, cluster, gpuflow_home, tmp_path):
    environment = _ssh_logging_to(tmp_path)
    before = _logins(server)
    done = _gpuflow("ssh", "mx", "--", "echo", "first", **environment)
    assert (done.returncode, done.stdout, done.stderr) == (0, "first\n", "")
    [call] = (tmp_path / "calls").read_text().splitlines()  # no separate `ssh -N -f` before it
    assert "ControlMaster=yes" in call and "ControlPersist=" in call and " -N " not in call
    path = _socket(gpuflow_home)
    assert _master_pid(path) and _logins(server) == before + 1  # it left the connection open
    (tmp_path / "calls").unlink()
    done = _gpuflow("ssh", "mx", "--", "echo", "second", **environment)
    assert (done.returncode, done.stdout) == (0, "second\n") and _logins(server) == before + 1
    [call] = (tmp_path / "calls").read_text().splitlines()
    assert "ControlMaster=auto" in call  # rode it


def _lock_free(path: str) -> bool:
    import fcntl

    with open(path + ".lock", "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(file, fcntl.LOCK_UN)
        return True


def _watchers() -> list[int]:
    """Processes of this user whose command line is a gpuflow ssh (the lock's watcher is a fork of one)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and b"gpuflow" in words and b"ssh" in words and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


_WATCHED = """
import fcntl, os, sys, time
from gpuflow.transport import openssh
openssh._MASTER_LISTEN_SECONDS = float(sys.argv[2])
path = sys.argv[1]
lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX)
openssh._hold_until_listening(lock, path)
os.close(lock)
print("handed over", flush=True)
time.sleep(60)  # alive, as the ssh it would have exec'd
"""


@pytest.mark.parametrize("appears", [True, False], ids=["the socket listens", "it never does"])
def test_the_watcher_keeps_the_lock_until_the_socket_listens_and_never_longer_than_its_bound(tmp_path, appears):
    path = str(tmp_path / "socket")
    process = subprocess.Popen([sys.executable, "-c", _WATCHED, path, "60" if appears else "0.5"],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    try:
        assert process.stdout.readline() == "handed over\n"
        if appears:
            assert not _lock_free(path)  # held for the connecting master, after its process let go
            Path(path).write_text("")  # the master listens
        wait_for(lambda: _lock_free(path), timeout=10, what="the watcher to let the lock go")
        assert process.poll() is None  # while the command itself goes on
    finally:
        process.kill()
        process.wait()


def test_a_first_connection_that_fails_leaves_the_lock_free_and_no_watcher(server, cluster, gpuflow_home):
    StateStore(gpuflow_home, "clusters").put("mx", {**cluster.to_dict(), "ssh_port": 1})
    hostkeys.pin_host_keys(nodes.known_hosts_path("mx"), "127.0.0.1", 1,
                           [hostkeys.parse_public_key(server.host_public_key)])
    [path] = [option.split("=", 1)[1] for option in fast_argv(["ssh", "mx", "--", "true"])
              if option.startswith("ControlPath=")]
    assert _gpuflow("ssh", "mx", "--", "true").returncode == 255
    wait_for(lambda: _lock_free(path), timeout=5, what="the watcher to let the lock go")
    wait_for(lambda: not _watchers(), timeout=5, what="the watcher to exit")


def test_a_first_connection_that_fails_says_why_once(server, cluster, gpuflow_home):
    StateStore(gpuflow_home, "clusters").put("mx", {**cluster.to_dict(), "ssh_port": 1})
    hostkeys.pin_host_keys(nodes.known_hosts_path("mx"), "127.0.0.1", 1,
                           [hostkeys.parse_public_key(server.host_public_key)])
    done = _gpuflow("ssh", "mx", "--", "echo", "ran")
    assert done.returncode == 255 and done.stdout == ""
    assert done.stderr.count("Connection refused") == 1, done.stderr
    assert openssh.master_sockets(str(gpuflow_home)) == []


def test_the_fast_path_and_the_full_command_use_the_same_socket(cluster, gpuflow_home):
    fast = fast_argv(["ssh", "mx", "--", "true"])
    full = list(nodes.ssh_invocation(cluster, ["true"]).argv)
    assert fast == full
    [control] = [option for option in fast if option.startswith("ControlPath=")]
    assert {"ControlMaster=auto", f"ControlPersist={openssh.DEFAULT_PERSIST_SECONDS}"} <= set(fast)
    assert control.startswith(f"ControlPath={gpuflow_home / openssh.CONTROL_DIRECTORY}/")


def _control_path(cluster, node: Node, **changes) -> str:
    target = nodes.ssh_target_for(cluster, node)
    target = SSHTarget(**{**{field: getattr(target, field) for field in ("host", "port", "user", "key_path",
                                                                         "known_hosts_path")}, **changes})
    return openssh.control_path(str(gpuflow_home()), cluster.name, nodes.node_identity(cluster, node), target)


def test_any_change_of_the_nodes_identity_gets_another_socket(server, cluster, gpuflow_home):
    node = cluster.head
    path = _control_path(cluster, node)
    assert _control_path(cluster, node) == path
    others = {
        _control_path(cluster, Node("i-0ffffffffffffffff", "running", public_ip="127.0.0.1")),  # a new instance
        _control_path(replace(cluster, created_at="2026-12-01T00:00:00Z"), node),  # a re-created cluster
        _control_path(replace(cluster, name="other"), node),
        _control_path(cluster, node, host="127.0.0.2"),  # a recycled address elsewhere
        _control_path(cluster, node, port=server.port + 1),
        _control_path(cluster, node, user="someone"),
        _control_path(cluster, node, key_path="/elsewhere/key"),
    }
    known_hosts = nodes.known_hosts_path(cluster.name)
    known_hosts.write_text(known_hosts.read_text() + "# re-pinned\n")  # any change of the pinned keys
    others.add(_control_path(cluster, node))
    assert path not in others and len(others) == 8


def test_a_new_instance_id_or_repinned_key_makes_a_new_master(server, cluster, gpuflow_home):
    before = _logins(server)
    assert _gpuflow("ssh", "mx", "--", "true").returncode == 0
    StateStore(gpuflow_home, "clusters").put("mx", {**cluster.to_dict(), "nodes": [
        {**cluster.head.to_dict(), "instance_id": "i-0ffffffffffffffff"}]})
    assert _gpuflow("ssh", "mx", "--", "true").returncode == 0
    assert _logins(server) == before + 2  # the other instance did not ride the first one's master
    _pin(cluster, server)  # pinned again (same key, rewritten file): a different pinned file's content
    nodes.known_hosts_path("mx").write_text(nodes.known_hosts_path("mx").read_text() + "\n")
    assert _gpuflow("ssh", "mx", "--", "true").returncode == 0
    assert _logins(server) == before + 3
    assert len(openssh.master_sockets(str(gpuflow_home))) == 3
    openssh.close_masters(str(gpuflow_home))
    assert openssh.master_sockets(str(gpuflow_home)) == []


def test_persist_zero_shares_nothing(server, cluster, gpuflow_home):
    before = _logins(server)
    for _ in range(2):
        done = _gpuflow("ssh", "mx", "--", "echo", "ok", GPUFLOW_SSH_PERSIST="0")
        assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    assert _logins(server) == before + 2
    assert openssh.master_sockets(str(gpuflow_home)) == []



def test_persist_zero_builds_no_sharing_options(cluster, monkeypatch):
    monkeypatch.setenv(openssh.ENV_PERSIST, "0")
    for argv in (fast_argv(["ssh", "mx", "--", "true"]), list(nodes.ssh_invocation(cluster, ["true"]).argv)):
        assert argv is not None and not any(option.startswith("Control") for option in argv)


def test_a_bad_persist_value_is_one_line_and_nothing_runs(cluster):
    done = _gpuflow("ssh", "mx", "--", "echo", "ran", GPUFLOW_SSH_PERSIST="soon")
    assert done.returncode != 0 and "ran" not in done.stdout
    assert "GPUFLOW_SSH_PERSIST" in done.stderr and "Traceback" not in done.stderr


def test_a_killed_master_or_a_stale_socket_neither_hangs_nor_fails_the_next_command(server, cluster, gpuflow_home):
    assert _gpuflow("ssh", "mx", "--", "true").returncode == 0
    path = _socket(gpuflow_home)
    pid = _master_pid(path)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), what="the killed master to go")
    assert os.path.exists(path)  # its socket is left behind, stale
    before = _logins(server)
    done = _gpuflow("ssh", "mx", "--", "echo", "again")
    assert (done.returncode, done.stdout) == (0, "again\n"), done.stderr
    pid = _master_pid(path)
    assert _logins(server) == before + 1 and pid and _alive(pid)  # a new master on the same socket
    # A master whose connection the server dropped (a node gone) ends; the next command connects anew.
    server.drop_sessions()
    wait_for(lambda: not _alive(pid), what="the master of a dropped connection to end")
    done = _gpuflow("ssh", "mx", "--", "echo", "after-drop")
    assert (done.returncode, done.stdout) == (0, "after-drop\n"), done.stderr
    # Not a socket at all where the socket should be: OpenSSH replaces it.
    openssh.close_masters(str(gpuflow_home))
    Path(path).write_text("not a socket")
    done = _gpuflow("ssh", "mx", "--", "echo", "over-a-file")
    assert (done.returncode, done.stdout) == (0, "over-a-file\n"), done.stderr
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_socket_directory_that_is_not_private_turns_sharing_off(cluster, gpuflow_home):
    directory = gpuflow_home / openssh.CONTROL_DIRECTORY
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    argv = fast_argv(["ssh", "mx", "--", "true"])
    assert argv is not None and not any(option.startswith("Control") for option in argv)
    directory.chmod(0o700)
    assert any(option.startswith("ControlPath=") for option in fast_argv(["ssh", "mx", "--", "true"]))


@pytest.fixture
def short_tmpdir(monkeypatch):
    """A short $TMPDIR of this test's own (a socket's path must stay short)."""
    directory = tempfile.mkdtemp(prefix="gf-", dir="/tmp")
    monkeypatch.setenv("TMPDIR", directory)
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


def test_a_home_too_deep_for_a_socket_uses_a_private_directory_under_tmp(cluster, short_tmpdir):
    deep = Path(str(gpuflow_home()) + "/" + "d" * 60)
    target = nodes.ssh_target_for(cluster, cluster.head)
    placed = openssh.control_path(str(deep), "mx", ("", "i-1"), target)
    assert placed is not None and placed.startswith(str(short_tmpdir / f"gpuflow-cm-{os.getuid()}") + "/")
    assert len(placed) <= 86 and stat.S_IMODE(os.stat(Path(placed).parent).st_mode) == 0o700
    Path(placed).parent.chmod(0o777)  # someone made it reachable: no sharing rather than a socket there
    assert openssh.control_path(str(deep), "mx", ("", "i-1"), target) is None


def test_down_closes_the_clusters_masters_and_removes_their_sockets(server, cloud, provisioners, gpuflow_home):
    # A cluster of this gpuflow in the (moto) cloud whose record points at the loopback sshd.
    [instance] = cloud.run_instances(
        ImageId="ami-0123456789abcdef0", InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": "mx"},
            {"Key": "gpuflow:owner-id", "Value": clusters.owner_id()}]}],
    )["Instances"]
    made = make_cluster(server, "mx")
    made = replace(made, nodes=(replace(made.head, instance_id=instance["InstanceId"]),))
    StateStore(gpuflow_home, "clusters").put("mx", made.to_dict())
    _pin(made, server)
    other = make_cluster(server, "keep")
    _pin(other, server)
    for name in ("mx", "keep"):
        done = _gpuflow("ssh", name, "--", "true")
        assert done.returncode == 0, done.stderr
    [mine] = openssh.master_sockets(str(gpuflow_home), "mx")
    [kept] = openssh.master_sockets(str(gpuflow_home), "keep")
    mine_pid, kept_pid = _master_pid(mine), _master_pid(kept)
    assert mine_pid and kept_pid
    assert clusters.down("mx", provisioner_factory=provisioners).terminated == (instance["InstanceId"],)
    assert not os.path.exists(mine)
    wait_for(lambda: not _alive(mine_pid), what="the master to exit")
    assert _master_pid(kept) == kept_pid  # another cluster's connection is not touched


def test_reap_closes_the_masters_of_the_clusters_it_reaps(server, cloud, provisioners, gpuflow_home):
    # The record's own `up` is gone; an instance of another launch carries its name: an orphan of this gpuflow.
    cloud.run_instances(
        ImageId="ami-0123456789abcdef0", InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "gpuflow:managed", "Value": "true"}, {"Key": "gpuflow:cluster", "Value": "mx"},
            {"Key": "gpuflow:launch-id", "Value": "another-launch"},
            {"Key": "gpuflow:owner-id", "Value": clusters.owner_id()}]}],
    )
    made = make_cluster(server, "mx")
    _pin(made, server)
    assert _gpuflow("ssh", "mx", "--", "true").returncode == 0
    [path] = openssh.master_sockets(str(gpuflow_home), "mx")
    pid = _master_pid(path)
    assert pid
    report = clusters.reap(yes=True, provisioner_factory=provisioners)
    assert [item.cluster for item in report.items] == ["mx"]
    assert not os.path.exists(path)
    wait_for(lambda: not _alive(pid), what="the master to exit")


def test_a_socket_ssh_cannot_make_leaves_the_command_to_connect_on_its_own(server, cluster, tmp_path, capfd):
    argv = list(nodes.ssh_invocation(cluster, ["echo", "alone"]).argv)
    too_long = tmp_path / ("s" * 120)  # more than a unix socket's path can hold: OpenSSH cannot listen there
    argv = [f"ControlPath={too_long}" if word.startswith("ControlPath=") else word for word in argv]
    login = openssh.open_shared(argv)
    assert login == openssh.unshared(argv) and not any(word.startswith("Control") for word in login)
    assert capfd.readouterr().err == ""  # nothing said about the socket
    done = subprocess.run(login, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "alone\n", "")


def test_the_plugins_leak_check_reports_and_closes_an_open_shared_connection(server, cluster, gpuflow_home):
    from gpuflow.testing.leaks import LeakKind, local_leftovers, remove_local_leftovers

    assert local_leftovers(gpuflow_home, server_alive=lambda home: None) == []
    assert _gpuflow("ssh", "mx", "--", "true").returncode == 0
    path = _socket(gpuflow_home)
    pid = _master_pid(path)
    [leftover] = local_leftovers(gpuflow_home, server_alive=lambda home: None)
    assert (leftover.kind, leftover.identifier) == (LeakKind.SSH_MASTER, path)
    assert remove_local_leftovers(gpuflow_home, stop_server=lambda home: None) == []
    wait_for(lambda: not _alive(pid), what="the master to exit")
    assert local_leftovers(gpuflow_home, server_alive=lambda home: None) == []
