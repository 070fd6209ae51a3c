"""The `--recover` options of `run` and `gpuflow resume`: what they hand the use case, and
the combinations refused with one line and exit 2 before anything is launched."""

from __future__ import annotations

import pytest

from gpuflow.jobs.recover import RecoveryPolicy
from tests.cli.conftest import cli


def test_run_hands_the_recovery_policy_over_the_project_settings(project, run_spy, capfd, gpuflow_home):
    (project / "gpuflow.toml").write_text('recover = true\nmax_restarts = 2\nfallback_types = "g6.xlarge"\n')
    assert cli(["run", "--up", "--sandbox", "box", "--max-dollars", "4.5", "--restart-on-exit-codes", "1,137",
                "--", "python", "job.py"]) == 0
    [call] = run_spy.calls
    assert call["recovery"] == RecoveryPolicy(2, ("g6.xlarge",), frozenset({1, 137}), 4.5)
    assert cli(["run", "--up", "--sandbox", "box", "--no-recover", "--", "python", "job.py"]) == 0
    assert run_spy.calls[-1]["recovery"] is None


@pytest.mark.parametrize(("argv", "says"), [
    (["run", "--max-dollars", "5", "--", "python", "job.py"], "--max-dollars need --recover"),
    (["run", "--recover", "--detach", "--", "python", "job.py"], "--recover follows the run to restart it"),
    (["run", "--recover", "--restart-on-exit-codes", "75", "--", "python", "job.py"], "other than 75"),
    (["run", "--recover", "--fallback-types", "g6.xlarge;reboot", "--", "python", "job.py"], "is not an instance type"),
    (["run", "--spot-fallback", "--", "python", "job.py"], "need --up"),
    (["run", "--resume", "20261130-000000-abcd", "--recover"], "drop --recover"),
    (["resume", "20261130-000000-abcd", "--spot"], "only with --on NAME or --up"),
    (["resume", "20261130-000000-abcd", "--on", "box", "--detach"], "--detach only resumes a run on its own cluster"),
])
def test_refused_combinations(project, run_spy, capfd, gpuflow_home, argv, says):
    assert cli(argv) == 2
    assert says in capfd.readouterr().err
    assert run_spy.calls == []
