"""Destructive commands ask one way (issue 10, item 5): what will be deleted, then the question;
"n" deletes nothing and exits 0; without a terminal, --yes is required (`down NAME` too)."""

from __future__ import annotations

import io

import pytest

from gpuflow import clusters
from gpuflow.cli import _confirm
from gpuflow.errors import NotFound
from tests.cli.conftest import cli, sandbox_clusters


@pytest.fixture
def terminal(monkeypatch):
    """A person at a terminal: answers[] are their answers, questions[] what they were asked."""
    answers: list[bool] = []
    questions: list[str] = []

    def ask(question: str) -> bool:
        questions.append(question)
        return answers.pop(0)

    monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: True)
    monkeypatch.setattr(_confirm, "ask", ask)
    return answers, questions


def _no_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a tty


def test_down_asks_one_way_on_a_terminal_and_needs_yes_without_one(project, monkeypatch, capfd, gpuflow_home):
    with sandbox_clusters(project, "nc1", "nc2"):
        [instance_id] = [node.instance_id for node in clusters.get_cluster("nc1").nodes]
        capfd.readouterr()

        # Without a terminal: `down NAME` and `down --all` need --yes, and delete nothing.
        _no_terminal(monkeypatch)
        assert cli(["down", "nc1"]) == 2
        err = capfd.readouterr().err
        assert err.startswith("gpuflow: error: `gpuflow down` needs --yes when not run from a terminal")
        assert "(run `gpuflow down nc1 --yes`)" in err and len(err.splitlines()) == 1
        assert cli(["down", "--all"]) == 2
        assert "`gpuflow down --all` needs --yes" in capfd.readouterr().err
        assert clusters.get_cluster("nc1") and clusters.get_cluster("nc2")

        # A real prompt read from stdin, on a "terminal": "n" says so and exits 0.
        monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: True)
        monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
        assert cli(["down", "nc1"]) == 0
        out, err = capfd.readouterr()
        assert out == "nothing deleted\n"
        assert f"cluster nc1 in us-east-1 (sandbox): 1 instance(s) terminated ({instance_id})" in err
        assert err.index("this deletes:") < err.index("Delete? [y/N]")  # what, then the question
        assert clusters.get_cluster("nc1")

    # (the block's own teardown finds both clusters already down below)


def test_down_yes_on_a_terminal_and_with_yes_without_one(project, monkeypatch, capfd, terminal):
    answers, questions = terminal
    with sandbox_clusters(project, "nc1", "nc2"):
        answers.append(True)
        assert cli(["down", "nc1"]) == 0
        assert questions == ["Delete?"]
        assert "cluster nc1 is down" in capfd.readouterr().out
        with pytest.raises(NotFound):
            clusters.get_cluster("nc1")

        answers.append(False)
        assert cli(["down", "--all"]) == 0
        out, err = capfd.readouterr()
        assert out == "nothing deleted\n" and "every cluster this gpuflow knows" in err
        assert clusters.get_cluster("nc2")

        _no_terminal(monkeypatch)
        monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: False)
        assert cli(["down", "--all", "--yes"]) == 0
        assert "cluster nc2 is down" in capfd.readouterr().out
        assert len(questions) == 2  # --yes asked nothing
        with pytest.raises(NotFound):
            clusters.get_cluster("nc2")


def test_reap_lists_then_asks_on_a_terminal_and_stays_a_dry_run_without_one(
    project, monkeypatch, capfd, gpuflow_home, terminal
):
    answers, questions = terminal
    with sandbox_clusters(project, "orphan"):
        (gpuflow_home / "state" / "clusters" / "orphan.json").unlink()  # now nobody here owns it
        capfd.readouterr()

        answers.append(False)
        assert cli(["reap", "--sandbox"]) == 0
        out, err = capfd.readouterr()
        assert "would delete instance" in out and out.endswith("nothing deleted\n")
        assert "item(s) listed above" in err
        assert questions == ["Delete?"]

        monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: False)
        assert cli(["reap", "--sandbox"]) == 0  # without a terminal: a dry run that says how to delete
        out, err = capfd.readouterr()
        assert "would delete instance" in out and "deleted instance" not in out.replace("would delete", "")
        assert "dry run: run `gpuflow reap --yes --sandbox` to delete these" in err
        assert len(questions) == 1

        monkeypatch.setattr(_confirm, "stdin_is_terminal", lambda: True)
        answers.append(True)
        assert cli(["reap", "--sandbox"]) == 0
        out = capfd.readouterr().out
        assert "\ndeleted instance" in out
        assert cli(["reap", "--sandbox"]) == 0
        assert "nothing to reap" in capfd.readouterr().out
        assert len(questions) == 2
