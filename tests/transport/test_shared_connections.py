"""One SSH connection per command and node (gpuflow.transport.shared), against the real loopback sshd.

Connections are counted in the server's log (one "Accepted publickey" line per
login, whoever makes it: paramiko, or an OpenSSH process sync starts; an
attempt the loaded server reset before authenticating is not counted).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from gpuflow import jobs
from gpuflow.errors import RemoteCommandFailed, SecurityError
from gpuflow.records import SSHTarget
from gpuflow.sync import SSHDestination, sync_directory
from gpuflow.transport import hostkeys, shared
from gpuflow.transport.ssh import Backoff, SSHRunner
from tests.sshd import SshServer
from tests.jobs.conftest import fake_cluster, job_args, project  # noqa: F401 - the project fixture
from tests.waiting import wait_for

pytestmark = pytest.mark.ssh


def logins(server: SshServer) -> int:
    return server.log.read_text().count("Accepted publickey")


def all_closed(server: SshServer) -> bool:
    """No connection left: the server has no per-connection process."""
    assert server.process is not None
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True, check=False)
    return not children.stdout.split()


@pytest.fixture
def server(tmp_path):
    """A loopback sshd logging each login (its own: the per-login count is what the tests read)."""
    started = SshServer(tmp_path / "sshd", log_level="INFO").start()
    yield started
    started.stop()


@pytest.fixture
def target(server, tmp_path) -> SSHTarget:
    known_hosts = tmp_path / "known_hosts"
    hostkeys.pin_host_keys(str(known_hosts), "127.0.0.1", server.port, [hostkeys.parse_public_key(server.host_public_key)])
    return SSHTarget("127.0.0.1", server.port, server.user, str(server.client_key), str(known_hosts))


def _shared_runner(target: SSHTarget, base: Path):
    return shared.shared_runner(
        "node", target, lambda: SSHRunner(target, base_dir=str(base), backoff=Backoff(retries=4, initial=0.1))
    )


def _run_target(target: SSHTarget, base: Path) -> jobs.RunTarget:
    """A run target as `gpuflow run` builds one: runners from the factory, the real sync (absolute directory)."""
    return jobs.RunTarget(
        cluster=fake_cluster(),
        connect=lambda: _shared_runner(target, base),
        sync_project=lambda directory: sync_directory(directory, SSHDestination(target, f"{base}/project")),
    )


def test_a_run_syncs_starts_follows_and_pulls_over_one_connection(target, server, project, tmp_path):
    base = tmp_path / "instance"
    with shared.shared_connections() as scope:
        outcome = jobs.run(_run_target(target, base), project_dir=project, module=None, args=job_args(3),
                           out=io.BytesIO())
        socket_directory = scope.directory
        assert socket_directory is not None and logins(server) == 1
    assert outcome.exit_code == 0
    assert (base / "project" / "job.py").read_text() == (project / "job.py").read_text()  # synced, then run from there
    assert (Path(outcome.record.local_dir) / "outputs" / "metrics.json").is_file()  # pulled
    assert logins(server) == 1  # sync, start, follow and pull: one SSH connection
    assert not socket_directory.exists()
    wait_for(lambda: all_closed(server), what="the command's connection to close")


def test_the_socket_directory_is_private_short_and_removed_on_every_exit(target, server, tmp_path, gpuflow_home):
    for ending in (None, RuntimeError("a failing command"), KeyboardInterrupt()):
        with pytest.raises(type(ending)) if ending is not None else contextlib.nullcontext():
            with shared.shared_connections() as scope:
                runner = _shared_runner(target, tmp_path / "instance")
                argv = shared.bridge_argv(target)
                assert argv is not None
                socket_path = Path(argv[-1])
                directory = scope.directory
                assert directory is not None and socket_path.parent == directory
                info = directory.stat()
                assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
                assert stat.S_IMODE(directory.parent.stat().st_mode) == 0o700
                assert stat.S_ISSOCK(socket_path.stat().st_mode) and len(str(socket_path)) <= 100
                assert runner.run(["true"]).ok
                if ending is not None:
                    raise ending
        assert not directory.exists() and shared.current_scope() is None
        wait_for(lambda: all_closed(server), what="the connection to close")


def test_a_directory_others_can_reach_is_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(SecurityError):
        shared.check_private(loose)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(foreign, 65534, -1)
        with pytest.raises(SecurityError):
            shared.check_private(foreign)


def test_a_directory_left_by_a_killed_command_is_swept(gpuflow_home):
    dead = subprocess.Popen(["true"])
    dead.wait()
    parent = gpuflow_home / "mux"
    parent.mkdir(mode=0o700)
    left = parent / f"{dead.pid}-abcdefgh"
    left.mkdir(mode=0o700)
    with shared.shared_connections():
        shared.private_directory()
    assert not left.exists()


def test_the_bridge_carries_stdin_stdout_stderr_and_the_exit_status(target, server, tmp_path):
    with shared.shared_connections():
        _shared_runner(target, tmp_path / "instance").run(["true"])
        argv = shared.bridge_argv(target)
        assert argv is not None
        done = subprocess.run([*argv, "-o", "Ignored=yes", "host", "cat; echo", "said >&2; exit 3"],
                              input=b"data\n" * 50_000, capture_output=True, timeout=60)
    assert done.returncode == 3 and done.stdout == b"data\n" * 50_000 and done.stderr == b"said\n"
    assert logins(server) == 1


def test_a_killed_bridge_client_ends_its_remote_command(target, tmp_path):
    pid_file = tmp_path / "remote.pid"
    with shared.shared_connections():
        _shared_runner(target, tmp_path / "instance").run(["true"])
        argv = shared.bridge_argv(target)
        assert argv is not None
        # Its stdin stays open here: only the end of the session can end `cat`, as with ssh.
        client = subprocess.Popen([*argv, "host", f"echo $$ > {pid_file}; exec cat > /dev/null"],
                                  stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the remote command"))
        client.send_signal(signal.SIGINT)  # Ctrl-C
        assert client.wait(timeout=30) == -signal.SIGINT and client.stderr.read() == b""  # no traceback
        wait_for(lambda: not _alive(pid), what="the remote command to end")
        client.stdin.close()
        client.stderr.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_close_keeps_the_connection_after_success_and_drops_it_after_a_failure(target, server, tmp_path):
    with shared.shared_connections():
        runner = _shared_runner(target, tmp_path / "instance")
        runner.run(["true"])
        runner.close()
        again = _shared_runner(target, tmp_path / "instance")
        assert again is runner
        again.run(["true"])
        assert runner.connections_made == 1
        with pytest.raises(RemoteCommandFailed):
            runner.run(["false"])
        runner.close()  # after a failure: a fresh connection next time, as a new runner had
        runner.run(["true"])
        assert runner.connections_made == 2
        other_thread: list = []
        worker = threading.Thread(target=lambda: other_thread.append(_shared_runner(target, tmp_path / "i")))
        worker.start()
        worker.join()
        assert other_thread[0] is not runner  # one runner per thread: SSHRunner is not shared across threads
    assert logins(server) == 2


def test_the_bridge_reconnects_after_a_dropped_connection(target, server, tmp_path):
    out = tmp_path / "out"
    with shared.shared_connections():
        runner = _shared_runner(target, tmp_path / "instance")
        runner.run(["true"])
        argv = shared.bridge_argv(target)
        assert argv is not None
        server.drop_sessions()
        done = subprocess.run([*argv, "host", f"echo again > {out}"], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert out.read_text() == "again\n" and runner.connections_made == 2


def test_runner_for_hands_out_one_runner_per_node_within_a_scope(sshd_session, gpuflow_home):
    from gpuflow import nodes
    from tests.test_nodes import make_cluster

    cluster = make_cluster(sshd_session, nodes=2)
    hostkeys.pin_host_keys(nodes.known_hosts_path(cluster.name), "127.0.0.1", sshd_session.port,
                           [hostkeys.parse_public_key(sshd_session.host_public_key)])
    outside = nodes.runner_for(cluster)
    assert nodes.runner_for(cluster) is not outside
    with shared.shared_connections():
        head = nodes.runner_for(cluster)
        assert nodes.runner_for(cluster) is head
        assert nodes.runner_for(cluster, cluster.nodes[1]) is not head
        assert nodes.runner_for(cluster, connect_timeout=5) is not head  # other options: a runner of its own


def test_rsync_rides_on_the_same_connection(target, server, tmp_path):
    source = tmp_path / "source"
    (source / "sub dir").mkdir(parents=True)
    (source / "sub dir" / "it's.bin").write_bytes(os.urandom(50_000))
    destination = tmp_path / "instance" / "project"
    with shared.shared_connections():
        _shared_runner(target, tmp_path / "instance").run(["true"])
        report = sync_directory(source, SSHDestination(target, str(destination)), method="rsync")
    assert report.method == "rsync"
    assert (destination / "sub dir" / "it's.bin").read_bytes() == (source / "sub dir" / "it's.bin").read_bytes()
    assert logins(server) == 1


def test_concurrent_sessions_share_the_connection(target, server, tmp_path):
    """Two programs on the bridge at once (as a second sync, or rsync beside the listing session)."""
    with shared.shared_connections():
        _shared_runner(target, tmp_path / "instance").run(["true"])
        argv = shared.bridge_argv(target)
        assert argv is not None
        first, second = (subprocess.Popen([*argv, "host", "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                         for _ in range(2))
        outputs = [process.communicate(payload, timeout=60)[0] for process, payload in
                   ((second, b"second\n" * 10_000), (first, b"first\n" * 10_000))]
    assert outputs == [b"second\n" * 10_000, b"first\n" * 10_000] and logins(server) == 1


def test_a_process_of_another_user_gets_nothing_run(target, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setattr(shared, "_peer_uid", lambda client: os.getuid() + 1)  # as SO_PEERCRED would say
    with shared.shared_connections():
        _shared_runner(target, tmp_path / "instance").run(["true"])
        argv = shared.bridge_argv(target)
        assert argv is not None
        done = subprocess.run([*argv, "host", f"touch {marker}"], capture_output=True, timeout=60)
    assert done.returncode == 255 and not marker.exists()
