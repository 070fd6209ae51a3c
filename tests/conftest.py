"""Fixtures shared by the whole suite.

Every test runs with:
* a private ``GPUFLOW_HOME`` and ``KERAS_HOME`` (nothing touches ~),
* fake AWS credentials and region (nothing can reach a real AWS account),
* a guard that refuses any socket connection outside loopback, so a test that
  would talk to an address moto invented fails loudly instead of sending
  traffic,
* moto without its ~1,100 default AMIs per region (``MOTO_EC2_LOAD_DEFAULT_AMIS=false``,
  as the gpuflow_sandbox fixture runs it): every EC2 backend moto creates (each region, on
  every in-process sandbox's start and reset, in every sandbox server) loaded them, ~0.12 s
  of CPU each, and no test uses them (gpuflow launches the DLAMI the sandbox seeds, or an
  AMI a test names).  Set in this process's environment, so the sandbox servers and gpuflow
  processes the tests start inherit it; ``MOTO_EC2_LOAD_DEFAULT_AMIS=true`` overrides it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

from tests.sshd import SshServer, sshd_available

os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_address(sock: socket.socket, address) -> None:
    if sock.family == socket.AF_UNIX:
        return
    host = address[0] if isinstance(address, tuple) else address
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    raise ConnectionRefusedError(f"test network guard: connection to {address!r} refused (loopback only)")


def _guarded_connect(self, address):
    _check_address(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(self, address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("gpuflow-home")
    monkeypatch.setenv("GPUFLOW_HOME", str(home))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home")))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SECURITY_TOKEN", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.delenv("GPUFLOW_DEBUG", raising=False)
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    yield home
    from gpuflow.transport.openssh import close_masters

    close_masters(str(home))  # `gpuflow ssh`'s shared connections (ControlPersist) end with their test


@pytest.fixture
def gpuflow_home(_isolated_environment) -> Path:
    return _isolated_environment


@pytest.fixture(scope="session")
def sshd_session(tmp_path_factory):
    """One loopback OpenSSH server shared by the tests that only need a host."""
    if not sshd_available():
        pytest.fail("OpenSSH server not installed: run `apt-get install -y openssh-server rsync` (.ci/run does)")
    server = SshServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def sshd(tmp_path):
    """A fresh loopback OpenSSH server for one test (which may drop or restart it)."""
    if not sshd_available():
        pytest.fail("OpenSSH server not installed: run `apt-get install -y openssh-server rsync` (.ci/run does)")
    server = SshServer(tmp_path / "sshd").start()
    yield server
    server.stop()


class FakeCloud:
    """A :class:`gpuflow.nodes.CloudProbe` standing in for the cloud: what EC2 would
    say about an instance (its console, its state), and how often it was asked."""

    def __init__(self) -> None:
        self.console = ""
        self.state = "running"
        self.state_calls = 0
        self.console_calls = 0

    def console_output(self, cluster, instance_id) -> str:
        self.console_calls += 1
        return self.console

    def instance_state(self, cluster, instance_id) -> str:
        self.state_calls += 1
        return self.state


@pytest.fixture
def fake_cloud() -> FakeCloud:
    """A probe to hand to gpuflow.nodes (``probe=fake_cloud``)."""
    return FakeCloud()


# The test files that take longest (the `--durations` lists of full runs), heaviest first.
# Under pytest-xdist (`-n 2 --dist loadfile`, the README's test command) whole files go to
# the workers in collection order: handing these out first keeps one of them from starting
# last and running on alone while the other worker idles.  Without xdist the order is untouched.
HEAVY_FILES_FIRST = (
    "tests/training/test_multiworker.py",
    "tests/jobs/test_multinode_parity.py",
    "tests/training/test_end_to_end.py",
    "tests/jobs/test_durable_recovery_oracle.py",
    "tests/testing/test_plugin.py",
    "tests/testing/test_plugin_without_a_project.py",
    "tests/jobs/test_cli_follow.py",
    "tests/infra/test_sandbox.py",
    "tests/infra/test_soak.py",  # after the TensorFlow-heavy start: its time budget buys more commands
    "tests/training/test_resume.py",
    "tests/training/test_visualize.py",
    "tests/jobs/test_cli_sandbox.py",
    "tests/jobs/test_spot_resume_oracle.py",
    "tests/jobs/test_recover_sandbox.py",
    "tests/durable/test_stack.py",
    "tests/tunnels/test_tensorboard_serve.py",
    "tests/jobs/test_demo_output.py",
    "tests/training/test_rerun_of_a_finished_run.py",
    "tests/clusters/test_switch.py",
    # collected last of all (testpaths: tests, then examples): a TensorFlow job in the sandbox
    "examples/digits-classifier/tests/test_gpuflow_smoke.py",
)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return
    rank = {path: index for index, path in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: files keep their order
