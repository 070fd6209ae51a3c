"""The interpreter a job starts from is found by the connection's first command (the base directory's),
not by a command of its own: one round trip fewer per connection that starts a job."""

from __future__ import annotations

import stat
import sys

from gpuflow import jobs
from gpuflow.transport.ssh import SSHRunner


def _runner(ssh_connect, tmp_path, **options) -> SSHRunner:
    """A runner to the loopback sshd as the fixture makes it, with these interpreters."""
    return SSHRunner(ssh_connect().target, base_dir=str(tmp_path / "ssh-instance"), **options)


def _count_commands(runner, monkeypatch) -> list[str]:
    commands: list[str] = []
    real_exec = runner._exec

    def counting_exec(command, **options):
        commands.append(command)
        return real_exec(command, **options)

    monkeypatch.setattr(runner, "_exec", counting_exec)
    return commands


def test_the_base_interpreter_comes_with_the_connection(ssh_connect, project, monkeypatch):
    runner = ssh_connect()
    try:
        commands = _count_commands(runner, monkeypatch)
        assert runner.base_dir.startswith("/")
        assert len(commands) == 1  # connecting: the base directory's command
        found = jobs.base_python(runner, project)
        assert commands[1:] == []  # nothing more: the first command answered it
        assert found.startswith("/") and found.rsplit("/", 1)[-1].startswith("python3")  # `command -v python3`
    finally:
        runner.close()


def test_the_first_job_python_present_wins_and_a_missing_one_is_skipped(ssh_connect, tmp_path, project, monkeypatch):
    framework = tmp_path / "framework python"
    framework.write_text("#!/bin/sh\nexec " + sys.executable + ' "$@"\n')
    framework.chmod(framework.stat().st_mode | stat.S_IXUSR)
    runner = _runner(ssh_connect, tmp_path, job_pythons=(str(tmp_path / "no such; python"), str(framework)))
    try:
        commands = _count_commands(runner, monkeypatch)
        assert jobs.base_python(runner, project) == str(framework)
        assert len(commands) == 1  # the connection's own
    finally:
        runner.close()


def test_a_fallback_found_nowhere_is_its_own_name(ssh_connect, tmp_path, project):
    runner = _runner(ssh_connect, tmp_path, job_pythons=(), python="no-such-python-gpuflow")
    try:
        assert runner.base_dir.startswith("/")  # connecting does not fail for it
        assert jobs.base_python(runner, project) == "no-such-python-gpuflow"
    finally:
        runner.close()
