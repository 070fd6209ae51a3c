"""The jobs package's typed state, its one quoting path for remote scripts, and
the interpreters a runner offers (decided where the runner is made, never by
asking what kind of runner it is)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile

import pytest

from gpuflow import jobs
from gpuflow.jobs import scripts
from gpuflow.jobs.environment import base_python
from gpuflow.jobs.records import InterruptChoice, RunState, RunStatus
from gpuflow.transport.local import LocalRunner

HOSTILE = ["it's", "a b", "$(touch pwned)", "`touch pwned`", "x;touch pwned", "*", "\"q\"", "-n", "new\nline", ""]


def _record(**changes):
    values = dict(
        run_id="20261130-100000-aaaa", cluster="c", base_dir="/b", remote_dir="/b/runs/x", command=("python", "t.py"),
        project_dir="/p", local_dir="/p/runs/x", started_at="2026-11-30T10:00:00+00:00",
    )
    return jobs.RunRecord(**{**values, **changes})


# --------------------------------------------------------------------------- typed status


@pytest.mark.parametrize(
    ("exit_code", "state", "text"),
    [(None, RunState.RUNNING, "running"), (0, RunState.SUCCEEDED, "succeeded"), (3, RunState.FAILED, "failed(3)"),
     (137, RunState.FAILED, "failed(137)")],
)
def test_an_exit_code_proves_one_status(exit_code, state, text):
    status = RunStatus.of_exit_code(exit_code)
    assert status.state is state and status.exit_code == exit_code and str(status) == text
    assert status.finished == (exit_code is not None)


def test_lost_and_unreachable_print_without_a_code():
    assert [str(RunStatus(RunState.LOST)), str(RunStatus(RunState.UNREACHABLE))] == ["lost", "unreachable"]
    assert not RunStatus(RunState.LOST).finished and not RunStatus(RunState.UNREACHABLE).finished


def test_a_record_keeps_its_status_typed_and_its_json_as_before(gpuflow_home):
    record = _record(status="failed", exit_code=2)  # a plain string is accepted and typed at once
    assert record.status is RunState.FAILED and record.run_status == RunStatus(RunState.FAILED, 2)
    document = record.to_dict()
    assert document["status"] == "failed" and type(document["status"]) is str
    assert json.loads(json.dumps(document))["status"] == "failed"
    jobs.save_record(record)
    stored = json.loads((gpuflow_home / "state" / "runs" / f"{record.run_id}.json").read_text())
    assert stored["status"] == "failed" and stored["exit_code"] == 2
    loaded = jobs.load_record(record.run_id)
    assert loaded == record and loaded.status is RunState.FAILED and loaded.status_text() == "failed(2)"
    changed = loaded.with_status(RunStatus.of_exit_code(0), lost_reason=None)
    assert changed.status is RunState.SUCCEEDED and changed.exit_code == 0 and changed.finished


def test_a_record_with_an_unknown_status_is_damaged_not_trusted(gpuflow_home, capsys):
    sound = _record(status="succeeded", exit_code=0)
    jobs.save_record(sound)
    bad = {**sound.to_dict(), "run_id": "20261130-100001-bbbb", "status": "exploded"}
    (gpuflow_home / "state" / "runs" / "20261130-100001-bbbb.json").write_text(json.dumps(bad))
    assert jobs.all_records() == [sound]
    assert "20261130-100001-bbbb.json" in capsys.readouterr().err
    with pytest.raises(ValueError):
        _record(status="exploded")


def test_the_ctrl_c_choice_is_an_enum():
    assert {choice.value for choice in InterruptChoice} == {"detach", "stop"}
    from gpuflow.jobs.on_cluster import _stop_on_interrupt

    assert _stop_on_interrupt(_record()) is InterruptChoice.STOP  # --down: the instance is going away


# --------------------------------------------------------------------------- one quoting path


def _bash(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, cwd=cwd, check=False)


def test_render_script_quotes_every_value_once(tmp_path):
    template = 'printf "%s\\0" {{one}} {{many}}'
    result = _bash(scripts.render_script(template, one="it's $(x)", many=HOSTILE), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\0")[:-1] == ["it's $(x)", *HOSTILE]
    assert not (tmp_path / "pwned").exists()


def test_render_script_puts_gpuflow_code_in_as_is_and_refuses_wrong_holes(tmp_path):
    script = scripts.render_script("case x in {{pattern}}) echo hit ;; esac", pattern=scripts.ShellCode("y|x"))
    assert _bash(script, tmp_path).stdout == b"hit\n"
    with pytest.raises(ValueError, match="missing"):
        scripts.render_script("echo {{a}} {{b}}", a="1")
    with pytest.raises(ValueError, match="unknown"):
        scripts.render_script("echo {{a}}", a="1", b="2")


def test_the_unpack_script_takes_any_path(tmp_path):
    directory = tmp_path / "it's a $(touch pwned) dir"
    archive = tmp_path / "x;touch pwned.tar"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("X = 1\n")
    with tarfile.open(archive, "w") as handle:
        handle.add(tmp_path / "pkg", arcname="pkg")
    result = _bash(scripts.unpack_script(str(archive), str(directory)), tmp_path)
    assert result.returncode == 0, result.stderr
    assert (directory / "pkg" / "m.py").read_text() == "X = 1\n" and not archive.exists()
    assert not (tmp_path / "pwned").exists()


def test_the_environment_script_takes_any_path(tmp_path):
    env_dir = tmp_path / "envs" / "it's $(touch pwned)"
    (env_dir).mkdir(parents=True)
    (env_dir / ".gpuflow-ready").write_text("")  # ready: the script only checks and says so
    script = scripts.prepare_environment_script(
        env_dir=str(env_dir), base_python="/no/such python", requirements=str(tmp_path / "r;touch pwned.txt")
    )
    result = _bash(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"reused\n" and not (tmp_path / "pwned").exists()
    assert (tmp_path / "envs" / "it's $(touch pwned).lock").exists()  # the lock sits next to the quoted path


def test_the_supervisor_and_launch_lines_keep_hostile_paths_whole(tmp_path):
    run_dir = tmp_path / "runs" / "it's $(touch pwned)"
    run_dir.mkdir(parents=True)
    (run_dir / "job.pid").write_text("1")
    assert _bash(scripts.wait_for_start_command(str(run_dir), 0.1), tmp_path).returncode == 0
    supervisor = scripts.render_supervisor(
        run_id="20261130-100000-aaaa", run_dir=str(run_dir), base_dir=str(tmp_path), work_dir=str(tmp_path / "p"),
        argv=HOSTILE, env={"A": "$(touch pwned)"},
    )
    assert _bash(f"bash -n -c {scripts.render_script('{{s}}', s=supervisor)}", tmp_path).returncode == 0
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- the runner's interpreters


def _executable(path, text="#!/bin/sh\necho fake\n"):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_local_runner_offers_this_interpreter_unless_told_otherwise(tmp_path):
    runner = LocalRunner(tmp_path / "base")
    assert runner.python == sys.executable and runner.job_pythons == ()
    assert base_python(runner, tmp_path) == sys.executable


def test_a_job_starts_from_the_first_interpreter_the_runner_offers(tmp_path):
    """Decided by the runner's properties, not by its type: a LocalRunner made
    like an instance's runner behaves like one."""
    missing = tmp_path / "no such python"
    framework = _executable(tmp_path / "framework python")
    runner = LocalRunner(tmp_path / "base", python="python3", job_pythons=(str(missing), str(framework)))
    assert base_python(runner, tmp_path) == str(framework)
    fallback = _executable(tmp_path / "fallback python")
    runner = LocalRunner(tmp_path / "base", python=str(fallback), job_pythons=(str(missing),))
    assert base_python(runner, tmp_path) == str(fallback)
    nowhere = LocalRunner(tmp_path / "base", python=str(missing), job_pythons=())
    assert base_python(nowhere, tmp_path) == str(missing)  # nothing found: its own name, as `python3` before


def test_gpuflows_own_probes_run_with_the_runners_python(tmp_path):
    """The status probe runs with ``runner.python``: a runner whose python is
    a stand-in that records its calls proves it is the one used."""
    log = tmp_path / "calls"
    stand_in = _executable(tmp_path / "py", f'#!/bin/sh\necho "$@" >> {log}\nexec {sys.executable} "$@"\n')
    runner = LocalRunner(tmp_path / "base", python=str(stand_in))
    report = jobs.run_status(runner, str(tmp_path / "base" / "runs" / "none"))
    assert report[str(tmp_path / "base" / "runs" / "none")]["exists"] is False
    assert log.read_text().startswith("-I -S -c ")


def test_an_ssh_runner_offers_the_amis_python_first():
    from gpuflow.records import SSHTarget
    from gpuflow.transport.ssh import AMI_FRAMEWORK_PYTHONS, SSHRunner

    target = SSHTarget(host="127.0.0.1", port=22, user="u", key_path="/k", known_hosts_path="/h")
    runner = SSHRunner(target)  # no connection is made to read these
    assert runner.python == "python3" and runner.job_pythons == AMI_FRAMEWORK_PYTHONS
    assert AMI_FRAMEWORK_PYTHONS[0] == "/opt/tensorflow/bin/python3"


def test_no_use_case_asks_what_kind_of_runner_it_holds():
    package = os.path.dirname(jobs.__file__)
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            text = open(os.path.join(package, name), encoding="utf-8").read()
            assert "LocalRunner" not in text and "SSHRunner" not in text, name


def test_stop_says_what_it_did_as_an_enum_and_refuses_an_answer_it_does_not_know(tmp_path):
    from gpuflow.errors import RemoteCommandFailed
    from gpuflow.jobs import StopOutcome

    run_dir = tmp_path / "base" / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "exit_code").write_text("0\n")
    assert jobs.stop_job(LocalRunner(tmp_path / "base"), str(run_dir)) is StopOutcome.FINISHED
    (run_dir / "exit_code").unlink()
    (run_dir / "job.pid").write_text("4242\n")
    answers = {"gone": StopOutcome.GONE}
    for said, expected in answers.items():
        stand_in = _executable(tmp_path / f"py-{said}", f"#!/bin/sh\necho {said}\n")
        assert jobs.stop_job(LocalRunner(tmp_path / "base", python=str(stand_in)), str(run_dir)) is expected
    confused = _executable(tmp_path / "py-confused", "#!/bin/sh\necho 'Traceback: oops'\n")
    with pytest.raises(RemoteCommandFailed, match="oops"):
        jobs.stop_job(LocalRunner(tmp_path / "base", python=str(confused)), str(run_dir))
