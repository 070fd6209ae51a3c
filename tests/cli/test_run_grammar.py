"""`gpuflow run`'s grammar (issue 10, items 1-3): one rule for a single word before `--`, job options
before `--` refused with the corrected command, and a module that does not exist refused before
anything is synced or launched."""

from __future__ import annotations

import pytest

from gpuflow import clusters, jobs
from gpuflow.errors import NotFound
from tests.cli.conftest import cli, sandbox_clusters


def _error(capfd) -> str:
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


def test_a_single_word_is_the_cluster_when_known_in_every_form(project, run_spy, capfd, gpuflow_home):
    with sandbox_clusters(project, "nc6"):
        for argv in (["run", "nc6"], ["run", "nc6", "--"], ["run", "-d", "nc6", "--"]):
            assert cli(argv) == 2, argv
            err = _error(capfd)
            assert "gpuflow: error: nc6 is a cluster: say what to run on it" in err
            assert "gpuflow run nc6 MODULE [-- ARGS], or gpuflow run nc6 -- COMMAND" in err
        assert run_spy.calls == []

        assert cli(["run", "nc6", "--", "nvidia-smi", "-L"]) == 0  # a plain command, not `python -m`
        call = run_spy.only()
        assert (call["cluster"], call["module"], call["args"]) == ("nc6", None, ["nvidia-smi", "-L"])

        capfd.readouterr()
        assert cli(["run", "nc6", "--epochs", "3"]) == 2  # a known cluster, then a job option: a module is missing
        assert "(gpuflow run nc6 MODULE -- --epochs 3)" in _error(capfd)

        run_spy.calls.clear()
        assert cli(["run", "nc6", "pkg.train", "--", "--lr", "0.1"]) == 0
        call = run_spy.only()
        assert (call["cluster"], call["module"], call["args"]) == ("nc6", "pkg.train", ["--lr", "0.1"])

        run_spy.calls.clear()
        assert cli(["run", "tool", "--", "x"]) == 0  # not a cluster: the module (a package with __main__.py)
        call = run_spy.only()
        assert (call["cluster"], call["module"], call["args"]) == ("nc6", "tool", ["x"])  # the only cluster

        # A misspelt module is refused before anything is synced or launched, with the closest name.
        run_spy.calls.clear()
        capfd.readouterr()
        assert cli(["run", "nc6", "pkg.trian"]) == 4
        assert "no module 'pkg.trian' in the project" in _error(capfd)
        assert cli(["run", "nc6", "training.cifar10_cn", "--", "--epochs", "1"]) == 4
        assert "(did you mean training.cifar10_cnn?)" in _error(capfd)
        assert cli(["run", "trainng.cifar10_cnn"]) == 4
        assert "(did you mean training.cifar10_cnn?)" in _error(capfd)
        assert cli(["run", "tol", "--", "x"]) == 4  # a command follows, but the word is a near-miss of a module
        err = _error(capfd)
        assert "'tol' is neither a known cluster nor a module of the project" in err and "(did you mean tool?)" in err
        assert cli(["run", "pkg.train.x", "--", "echo"]) == 4  # a dot: a module, whatever follows
        assert "no module 'pkg.train.x'" in _error(capfd)
        assert run_spy.calls == []
        assert cli(["run", "nc7", "--", "echo"]) == 0  # no dot, no module's name: the cluster (the run path
        assert run_spy.only()["cluster"] == "nc7"     # then says that no cluster nc7 exists, or whose it is)
        run_spy.calls.clear()
        assert run_spy.calls == []


def test_a_misspelt_module_touches_no_cluster_and_syncs_nothing(project, capfd, gpuflow_home):
    """The real run path (no spy): the refusal comes before sync, launch or `--up`."""
    with sandbox_clusters(project, "nc1"):
        before = set(gpuflow_home.rglob("*"))
        assert cli(["run", "nc1", "training.cifar10_cn"]) == 4
        assert "did you mean training.cifar10_cnn?" in _error(capfd)
        assert set(gpuflow_home.rglob("*")) == before  # no sync, no run directory, no record
        assert not any(path.name == "project" for path in before)
        assert jobs.all_records() == []
    assert cli(["run", "--up", "--sandbox", "--down", "fresh", "training.cifar10_cn"]) == 4
    assert "did you mean training.cifar10_cnn?" in _error(capfd)
    with pytest.raises(NotFound):
        clusters.get_cluster("fresh")
    assert not (gpuflow_home / "sandbox" / "fresh").exists()


def test_with_up_a_single_word_before_a_command_names_the_cluster_to_launch(project, run_spy, capfd):
    assert cli(["run", "--up", "--sandbox", "newbox", "--", "python", "job.py"]) == 0
    call = run_spy.only()
    assert (call["cluster"], call["module"], call["args"]) == ("newbox", None, ["python", "job.py"])
    run_spy.calls.clear()
    assert cli(["run", "--up", "--sandbox", "pkg.train", "--", "--lr", "1"]) == 0  # a module stays a module
    call = run_spy.only()
    assert (call["cluster"], call["module"]) == ("project", "pkg.train")


@pytest.mark.parametrize(
    ("argv", "corrected"),
    [
        (["run", "nc1", "training.cifar10_cnn", "--dataset", "digits"],
         "gpuflow run nc1 training.cifar10_cnn -- --dataset digits"),
        (["run", "-d", "nc1", "training.cifar10_cnn", "--epochs=3", "--detach", "--data", "d", "-x", "1", "--", "--a"],
         "gpuflow run -d nc1 training.cifar10_cnn --detach --data d -- --epochs=3 -x 1 --a"),
        (["run", "training.cifar10_cnn", "--dataset", "digits"], "gpuflow run training.cifar10_cnn -- --dataset digits"),
        (["run", "nc1", "training.cifar10_cnn", "digits", "--epochs", "3"],
         "gpuflow run nc1 training.cifar10_cnn -- digits --epochs 3"),
        (["run", "nc1", "training.cifar10_cnn", "digits"], "gpuflow run nc1 training.cifar10_cnn -- digits"),
        (["ssh", "nc1", "ls", "-la", "/tmp"], "gpuflow ssh nc1 -- ls -la /tmp"),
    ],
)
def test_job_options_before_the_double_dash_get_the_corrected_command(project, run_spy, capfd, argv, corrected):
    assert cli(argv) == 2
    err = _error(capfd)
    assert "after `--`" in err and f"({corrected})" in err
    assert "Possible options" not in err
    assert run_spy.calls == []


def test_an_unknown_option_before_any_positional_is_a_misspelt_gpuflow_option(project, run_spy, capfd):
    assert cli(["run", "--detatch", "pkg.train"]) == 2
    assert "No such option: --detatch (Possible options: --data, --detach)" in _error(capfd)
    assert cli(["ssh", "--nod", "i-1", "nc1"]) == 2
    assert "No such option: --nod" in _error(capfd)
    assert run_spy.calls == []


def test_a_package_without_main_is_refused_naming_its_modules(project, run_spy, capfd):
    assert cli(["run", "pkg"]) == 4
    assert "'pkg' is a package without __main__.py: `python -m pkg` cannot run it (name one of its modules: " \
        "pkg.train)" in _error(capfd)
    assert cli(["run", "training"]) == 4
    assert "name one of its modules: training." in _error(capfd)
    assert run_spy.calls == []
