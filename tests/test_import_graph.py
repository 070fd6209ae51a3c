"""bench/import_graph.py: the import rules checked on small synthetic trees, and on this repository."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def _load_checker():
    spec = importlib.util.spec_from_file_location("import_graph", REPOSITORY / "bench" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


import_graph = _load_checker()

# A tree that follows every rule: one module per layer, each importing the layer below,
# boto3 and the infra.aws factory imported inside functions, a package re-exporting its modules.
CLEAN = {
    "gpuflow/__init__.py": '__version__ = "0"\n',
    "gpuflow/__main__.py": "from gpuflow.cli import main\n",
    "gpuflow/cli/__init__.py": "from gpuflow.cli import cluster\nfrom gpuflow.jobs import run\n\ndef main(): ...\n",
    "gpuflow/cli/cluster.py": "from gpuflow.clusters import up\nfrom gpuflow import __version__\n",
    "gpuflow/clusters/__init__.py": "from gpuflow.clusters.launch import up\n",
    "gpuflow/clusters/launch.py": """
        from gpuflow.nodes import runner_for
        from gpuflow.provisioner import open_provisioner
        from gpuflow.errors import GpuflowError

        def up():
            from infra.aws import open_aws  # the boto3 factory, late for --help
            import boto3
    """,
    "gpuflow/jobs/__init__.py": "from .start import run\n",
    "gpuflow/jobs/start.py": "from ..clusters import up\nfrom . import scripts\n",
    "gpuflow/jobs/scripts.py": "import shlex\nfrom gpuflow.transport.base import quote\n",
    "gpuflow/nodes.py": "from gpuflow.transport import local\nfrom gpuflow.records import Cluster\n",
    "gpuflow/transport/__init__.py": "",
    "gpuflow/transport/base.py": "from gpuflow.records import CommandResult\n",
    "gpuflow/transport/local.py": "from .base import quote\n\ndef connect():\n    from gpuflow.transport import ssh\n",
    "gpuflow/transport/ssh.py": "import paramiko\nfrom gpuflow.transport.base import quote\n",
    "gpuflow/provisioner.py": "from gpuflow.errors import UsageError\nfrom infra.port import Provisioner\n",
    "gpuflow/errors.py": "class GpuflowError(Exception): ...\n",
    "gpuflow/config.py": "from gpuflow.errors import GpuflowError\n",
    "gpuflow/records.py": """
        from typing import TYPE_CHECKING
        from gpuflow.errors import GpuflowError

        if TYPE_CHECKING:
            from gpuflow.state import Store  # never runs: no cycle with state
    """,
    "gpuflow/state.py": "from gpuflow.records import Cluster\n",
    "infra/__init__.py": "",
    "infra/port.py": "from infra.errors import CloudError\n",
    "infra/errors.py": "class CloudError(Exception): ...\n",
    "infra/aws/__init__.py": "import boto3\nfrom infra.port import Provisioner\n",
    "training/__init__.py": "",
    "training/mnist_mlp.py": "import numpy\nfrom training import data\n\ndef main():\n    import keras\n",
    "training/data.py": "import numpy\n",
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def violations(root: Path) -> list[str]:
    return [str(problem) for problem in import_graph.check(import_graph.build_graph(root))]


def test_a_clean_tree_passes_and_its_graph_is_printed(tmp_path, capsys):
    root = write_tree(tmp_path, CLEAN)
    assert violations(root) == []
    assert import_graph.main(["--root", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "gpuflow.clusters.launch (use cases)\n" in printed
    assert "  -> infra.aws [function-level]\n" in printed  # function-level imports are marked
    assert "  -> gpuflow.state [TYPE_CHECKING]\n" in printed
    assert "  -> gpuflow.jobs.start\n" in printed  # a relative import, resolved
    assert "no violations" in printed


def test_a_cycle_is_found_and_its_path_reported(tmp_path, capsys):
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/errors.py": "from gpuflow.state import load\n"})
    problems = violations(root)
    # errors -> state -> records -> errors: one cycle, every hop named in order.
    assert [problem for problem in problems if problem.startswith("cycle:")] == [
        "cycle: gpuflow.errors -> gpuflow.state -> gpuflow.records -> gpuflow.errors"]
    assert import_graph.main(["--root", str(root), "--quiet"]) == 1
    assert "cycle: gpuflow.errors -> gpuflow.state" in capsys.readouterr().out


def test_a_function_level_import_does_not_hide_a_cycle(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/nodes.py": CLEAN["gpuflow/nodes.py"]
                                 + "\ndef probe():\n    from gpuflow.clusters import launch\n"})
    problems = violations(root)
    [cycle] = [problem for problem in problems if problem.startswith("cycle:")]
    assert cycle.startswith(
        "cycle: gpuflow.clusters.launch -> gpuflow.nodes -> gpuflow.clusters.launch [function-level]")
    assert ("upward: gpuflow.nodes (line 5) [reaching nodes] imports gpuflow.clusters.launch [function-level] "
            "[use cases]") in problems


def test_a_type_checking_import_makes_no_cycle(tmp_path):
    # records -> state only under TYPE_CHECKING, state -> records at import: no cycle (the clean tree has it).
    graph = import_graph.build_graph(write_tree(tmp_path, CLEAN))
    [edge] = [edge for edge in graph.edges if (edge.source, edge.target) == ("gpuflow.records", "gpuflow.state")]
    assert edge.type_checking and not edge.function_level
    assert not [problem for problem in import_graph.check(graph) if problem.kind == "cycle"]


def test_infra_importing_gpuflow_is_flagged(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "infra/port.py": "from infra.errors import CloudError\n"
                                                            "from gpuflow.errors import GpuflowError\n"})
    assert violations(root) == [
        "boundary: infra must not import gpuflow: infra.port (line 2) imports gpuflow.errors"]


def test_infra_importing_gpuflow_inside_a_function_is_flagged_too(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "infra/aws/__init__.py": CLEAN["infra/aws/__init__.py"]
                                 + "\ndef home():\n    from gpuflow.config import gpuflow_home\n"})
    assert "boundary: infra must not import gpuflow: infra.aws (line 5) imports gpuflow.config [function-level]" \
        in violations(root)


def test_training_importing_gpuflow_or_infra_is_flagged(tmp_path):
    root = write_tree(tmp_path, {**CLEAN,
                                 "training/data.py": "import numpy\nimport gpuflow.errors\nfrom infra import port\n"})
    assert violations(root) == [
        "boundary: training must not import gpuflow: training.data (line 2) imports gpuflow.errors",
        "boundary: training must not import infra: training.data (line 3) imports infra.port",
    ]


def test_an_upward_import_is_flagged(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/state.py": "from gpuflow.records import Cluster\n"
                                                              "from gpuflow.transport.base import quote\n"})
    assert violations(root) == [
        "upward: gpuflow.state (line 2) [core] imports gpuflow.transport.base [reaching nodes]"]


def test_an_upward_relative_import_through_a_package_reexport_is_flagged(tmp_path):
    # A core module takes `run` from the jobs package: an import of gpuflow.jobs (whose
    # __init__ re-exports gpuflow.jobs.start), written relatively.
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/hints.py": "import shlex\nfrom .jobs import run\n"})
    assert violations(root) == ["upward: gpuflow.hints (line 2) [core] imports gpuflow.jobs [use cases]"]


def test_a_package_reexport_counts_as_importing_its_modules(tmp_path):
    # start imports the jobs package, whose __init__ imports start: a cycle through the re-export.
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/jobs/start.py": "from gpuflow.jobs import scripts, run\n"})
    cycles = [problem for problem in violations(root) if problem.startswith("cycle:")]
    assert cycles == ["cycle: gpuflow.jobs -> gpuflow.jobs.start -> gpuflow.jobs"]


def test_function_level_imports_pass_only_where_they_keep_start_up_fast(tmp_path):
    # boto3, the factories that open it and paramiko, and (from the CLI) the use cases may be
    # imported late; a cheap core module may not, nor may a use case from anywhere but the CLI.
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/cli/cluster.py": """
        from gpuflow import __version__

        def up():
            import boto3
            import moto
            from gpuflow.transport.ssh import connect
            from infra.aws import open_aws
            from gpuflow.clusters import up
            from gpuflow.errors import GpuflowError
    """, "gpuflow/jobs/scripts.py": CLEAN["gpuflow/jobs/scripts.py"] + "\ndef later():\n    from gpuflow.clusters import up\n"})
    assert violations(root) == [
        "function-level: gpuflow.cli.cluster (line 9) imports gpuflow.errors inside a function "
        "(move it to the module's top; see FUNCTION_LEVEL_ALLOWED)",
        "function-level: gpuflow.jobs.scripts (line 5) imports gpuflow.clusters inside a function "
        "(move it to the module's top; see FUNCTION_LEVEL_ALLOWED)"]


def test_a_new_module_outside_the_layer_table_is_flagged(tmp_path):
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/newthing.py": "import json\n"})
    assert violations(root) == [
        "unplaced: gpuflow.newthing is in no layer: add it to LAYERS in bench/import_graph.py"]


def test_dot_output_marks_the_violating_import(tmp_path, capsys):
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/state.py": "from gpuflow.transport import base\n"})
    assert import_graph.main(["--root", str(root), "--dot"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("digraph imports {")
    assert '"gpuflow.state" -> "gpuflow.transport.base" [style=solid, color="red"];' in captured.out
    assert '"gpuflow.clusters.launch" -> "infra.aws" [style=dashed];' in captured.out
    assert "upward: gpuflow.state" in captured.err


def test_an_empty_root_is_an_error_not_a_pass(tmp_path, capsys):
    assert import_graph.main(["--root", str(tmp_path)]) == 2
    assert "no Python modules" in capsys.readouterr().err


def test_a_file_that_does_not_parse_is_an_error_naming_it(tmp_path, capsys):
    root = write_tree(tmp_path, {**CLEAN, "gpuflow/state.py": "def (:\n"})
    assert import_graph.main(["--root", str(root)]) == 2
    assert "state.py" in capsys.readouterr().err


def test_the_repository_follows_the_import_rules():
    problems = violations(REPOSITORY)
    assert problems == [], "\n".join(problems)
