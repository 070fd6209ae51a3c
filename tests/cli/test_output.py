"""What the CLI prints (issue 10, items 6 and 9): a detach by Ctrl-C is information, not an error;
the `runs` table sizes its columns to their content."""

from __future__ import annotations

from gpuflow import jobs
from gpuflow.jobs import RunRecord
from tests.cli.conftest import cli


def test_a_detach_by_ctrl_c_is_information_and_keeps_exit_code_130(project, run_spy, capfd):
    run_spy.detached = True  # the run was followed, then Ctrl-C was answered with "detach"
    assert cli(["run", "nc1", "pkg.train"]) == 130
    err = capfd.readouterr().err
    assert err.startswith("gpuflow: detached: run 20261130-000000-spy0 keeps running on nc1 (")
    assert "gpuflow logs 20261130-000000-spy0 -f" in err
    assert "error" not in err


def _record(run_id: str, cluster: str, module: str | None, command: tuple[str, ...]) -> RunRecord:
    return RunRecord(
        run_id=run_id, cluster=cluster, base_dir="/b", remote_dir=f"/b/runs/{run_id}", command=command,
        project_dir="/p", local_dir=f"/p/runs/{run_id}", started_at="2026-11-30T10:00:00+00:00",
        status="failed", exit_code=3, module=module,
    )


def test_the_runs_table_sizes_each_column_to_its_content(gpuflow_home, capsys):
    long_cluster = "demo-20261130-101500-a1b2c3"  # 27 characters, as `gpuflow demo` names its clusters
    jobs.save_record(_record("20261130-101500-aaaa", long_cluster, "training.cifar10_cnn", ("python", "-m", "x")))
    jobs.save_record(_record("20261130-101600-bbbb", "nc1", None, ("sh", "-c", "echo 'a b'")))
    assert cli(["runs"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["RUN", "CLUSTER", "STATUS", "STARTED", "COMMAND"]
    status_at = header.index("STATUS")
    assert status_at > header.index("CLUSTER") + len(long_cluster)  # the column holds the longest name
    for row in rows:
        assert row[status_at:].startswith("failed(3) ")  # every row's STATUS starts under its heading
        assert row[header.index("COMMAND"):] in ("training.cifar10_cnn", "sh -c 'echo '\"'\"'a b'\"'\"''")
    assert rows[0].split()[1] == "nc1" and rows[1].split()[1] == long_cluster  # newest first
