"""infra/ is the cloud layer: it imports nothing from gpuflow (issue 9), and no module is over ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_infra_imports_nothing_from_gpuflow():
    found = {
        (str(path.relative_to(INFRA.parent)), name)
        for path in sorted(INFRA.rglob("*.py"))
        for name in _imports(path)
        if name == "gpuflow" or name.startswith("gpuflow.")
    }
    assert not found, f"infra imports gpuflow: {sorted(found)}"


def test_a_sandbox_provisioner_is_opened_only_with_what_discards_its_instances():
    """infra cannot ask gpuflow how a sandbox instance is discarded: the caller says (gpuflow's
    cloud port does), or gets a TypeError -- never a sandbox whose `terminate` leaves jobs running."""
    from infra.aws import open_provisioner

    with pytest.raises(TypeError, match="discard_instance"):
        open_provisioner("us-east-1", sandbox=True, endpoint_url="http://127.0.0.1:9")


def test_each_infra_module_says_what_it_owns_and_stays_readable():
    for path in sorted(INFRA.rglob("*.py")):
        source = path.read_text()
        assert ast.get_docstring(ast.parse(source)), f"{path} has no opening docstring"
        assert source.count("\n") <= 500, f"{path} has {source.count(chr(10))} lines"
