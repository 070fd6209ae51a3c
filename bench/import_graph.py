#!/usr/bin/env python3
"""The import graph of gpuflow/, infra/ and training/, read statically (ast; nothing is imported), and its rules.

Run ``python3 bench/import_graph.py`` from the repository root: it prints every
module with the project modules it imports (function-level, TYPE_CHECKING and
dynamic imports marked; one line per imported module and kind, at its first line)
and exits 1 listing each violation, 0 when there is none, 2 when it cannot read the tree.
``--dot`` prints the graph for Graphviz instead; ``--quiet`` prints only violations.

Rules checked:
* no import cycle between modules (module-level and function-level imports both
  count: a function-level import does not make a cycle go away, it hides it);
* the boundaries in BOUNDARIES (infra imports nothing from gpuflow; training
  imports neither gpuflow nor infra);
* the layer order in LAYERS: a module imports only its own layer or layers below;
* function-level imports of project modules only as FUNCTION_LEVEL_ALLOWED says
  (the factories that open boto3/moto/paramiko/Keras, and the use cases the CLI's
  commands load, kept out of ``gpuflow --help``); third-party function-level
  imports are not checked;
* every gpuflow/ and infra/ module is in a layer (a new module must be placed).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------- rules, as data
# The layers of gpuflow + infra, top to bottom.  A module belongs to the layer
# of the longest prefix below that names it or a package above it ("gpuflow.jobs"
# covers gpuflow/jobs/__init__.py and every gpuflow/jobs/*.py).  A module may
# import modules of its own layer and of any layer further down the list, never
# one further up.  When a module moves or a package is added, edit only this table.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # gpuflow.testing: the pytest plugin, a consumer of the use cases like the CLI (nothing imports it).
    ("testing", ("gpuflow.testing",)),
    ("cli", ("gpuflow.cli", "gpuflow.__main__", "gpuflow.ssh_fast")),
    ("use cases", ("gpuflow.clusters", "gpuflow.jobs", "gpuflow.sync", "gpuflow.project_init", "gpuflow.durable",
                   "gpuflow.tunnels")),
    ("reaching nodes", ("gpuflow.transport", "gpuflow.nodes", "gpuflow.ssh_config")),
    ("cloud port", ("gpuflow.provisioner",)),
    ("core", ("gpuflow.__init__", "gpuflow.errors", "gpuflow.records", "gpuflow.state", "gpuflow.config", "gpuflow.home",
              "gpuflow.procs", "gpuflow.hints")),
    ("cloud (infra)", ("infra",)),
]
# ("gpuflow.__init__" names the package module gpuflow itself, not everything under it:
# a new gpuflow module has to be placed, or the check says it is unplaced.)

# Top-level packages that must not import the ones listed (whatever the layers say).
BOUNDARIES: dict[str, tuple[str, ...]] = {
    "infra": ("gpuflow",),
    "training": ("gpuflow", "infra"),
}

# The project imports a function may make: (importer, imported) -- a module under
# ``importer`` ("" = any module) may import a module under ``imported`` inside a
# function.  Each entry is there because importing it at the top costs start-up
# time that a command which does not use it should not pay.  Any other project
# import belongs at the top of the module.
FUNCTION_LEVEL_ALLOWED: tuple[tuple[str, str], ...] = (
    # The factories that open boto3/moto and paramiko, kept out of `gpuflow --help`
    # (boto3 alone takes ~0.15 s to import; the whole start-up budget is 0.2 s).
    ("", "infra.aws"),
    ("", "infra.sandbox"),
    ("", "gpuflow.transport.ssh"),
    # The CLI's commands import the use cases when they run: measured with
    # `python -X importtime` (2026-11-30), the use-case packages (and what they pull
    # in: the state cache, infra's records, the sync engine, the SSH layer) add
    # 0.16-0.23 s to the ~0.08 s of typer + the command modules `gpuflow --help` loads.
    ("gpuflow.cli", "gpuflow.clusters"),
    ("gpuflow.cli", "gpuflow.jobs"),
    ("gpuflow.cli", "gpuflow.sync"),
    ("gpuflow.cli", "gpuflow.nodes"),
    ("gpuflow.cli", "gpuflow.ssh_config"),
    ("gpuflow.cli", "gpuflow.project_init"),
    ("gpuflow.cli", "gpuflow.durable"),
    ("gpuflow.cli", "gpuflow.tunnels"),
    # The entry point execs `gpuflow ssh NAME -- CMD` (gpuflow.ssh_fast) before typer and the
    # command modules load (~0.2 s of CPU here); every other command imports the CLI.
    ("gpuflow.__main__", "gpuflow.cli"),
    ("gpuflow.__main__", "gpuflow.ssh_fast"),  # only for `gpuflow ssh`: `gpuflow --help` does not load gpuflow.nodes
    # gpuflow.testing: the plugin module pytest loads wherever gpuflow is installed imports its
    # fixture's implementation (and through it the use cases, moto) only when a test uses the fixture.
    ("gpuflow.testing", "gpuflow.testing"),
    # training.layers imports Keras (seconds, and TensorFlow): the helpers that load a
    # saved model import it when called, so argument errors and data-only paths stay fast.
    ("training", "training.layers"),
)

# The top-level packages read.
PACKAGES: tuple[str, ...] = ("gpuflow", "infra", "training")


# --------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    function_level: bool = False  # inside a def: runs when called, not at import
    type_checking: bool = False  # under `if TYPE_CHECKING:`: never runs
    dynamic: bool = False  # importlib.import_module("...") / __import__("...") with a literal name

    def label(self) -> str:
        marks = [name for name, on in (("function-level", self.function_level), ("TYPE_CHECKING", self.type_checking),
                                       ("dynamic", self.dynamic)) if on]
        return f"{self.target}" + (f" [{', '.join(marks)}]" if marks else "")


@dataclass(frozen=True)
class Graph:
    modules: dict[str, Path]  # module name -> file
    edges: tuple[Edge, ...]

    def edges_from(self, module: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.source == module]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in packages:
        directory = root / package
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[module_name(root, path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` names: itself, else its longest prefix that is one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.function_depth = 0
        self.type_checking_depth = 0
        self.edges: list[Edge] = []

    def _add(self, target: str | None, node: ast.AST, dynamic: bool = False) -> None:
        if target is None or target == self.module:
            return
        self.edges.append(Edge(self.module, target, getattr(node, "lineno", 0), function_level=self.function_depth > 0,
                               type_checking=self.type_checking_depth > 0, dynamic=dynamic))

    def _function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking_depth += 1
            for child in node.body:
                self.visit(child)
            self.type_checking_depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(_resolve(alias.name, self.modules), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".") if self.package else []
            if node.level > 1:
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}" if base else alias.name
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
            self._add(submodule if submodule in self.modules else _resolve(base, self.modules), node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self._add(_resolve(node.args[0].value, self.modules), node, dynamic=True)
        self.generic_visit(node)


def build_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> Graph:
    modules = find_modules(root, packages)
    edges: list[Edge] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _ImportVisitor(name, path.name == "__init__.py", modules)
        visitor.visit(tree)
        seen: set[tuple[str, bool, bool, bool]] = set()
        for edge in visitor.edges:  # one edge per (target, kind), at the first line that makes it
            key = (edge.target, edge.function_level, edge.type_checking, edge.dynamic)
            if key not in seen:
                seen.add(key)
                edges.append(edge)
    return Graph(modules, tuple(edges))


# --------------------------------------------------------------------------- the rules
def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    """Index into ``layers`` (0 = top) of the longest entry naming ``module`` (itself or a package
    above it; ``pkg.__init__`` only the package module ``pkg``); None if no entry does."""
    best: tuple[int, int] | None = None  # (prefix length, index)
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if prefix.endswith(".__init__"):
                matches = module == prefix[: -len(".__init__")]
            else:
                matches = _under(module, prefix)
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _cycles(graph: Graph) -> list[tuple[list[str], list[Edge]]]:
    """One shortest cycle per strongly connected component (TYPE_CHECKING imports never run: left out)."""
    adjacency: dict[str, list[Edge]] = {name: [] for name in graph.modules}
    for edge in graph.edges:
        if not edge.type_checking:
            adjacency[edge.source].append(edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(adjacency):  # Tarjan, iterative (no recursion limit on big trees)
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for next_position in range(position, len(adjacency[node])):
                target = adjacency[node][next_position].target
                if target not in index:
                    work.append((node, next_position + 1))
                    work.append((target, 0))
                    recurse = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if recurse:
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        previous: dict[str, Edge] = {}
        queue = deque([start])
        closing: Edge | None = None
        while queue and closing is None:  # breadth first: the shortest way back to start
            node = queue.popleft()
            for edge in adjacency[node]:
                if edge.target not in members:
                    continue
                if edge.target == start:
                    closing = edge
                    break
                if edge.target not in previous:
                    previous[edge.target] = edge
                    queue.append(edge.target)
        assert closing is not None
        path = [closing]
        while path[0].source != start:
            path.insert(0, previous[path[0].source])
        cycles.append((component, path))
    return cycles


@dataclass(frozen=True)
class Violation:
    kind: str  # cycle | unplaced | boundary | upward | function-level
    message: str
    edges: tuple[Edge, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def _where(edge: Edge) -> str:
    return f"{edge.source} (line {edge.line})"


def check(
    graph: Graph,
    layers: list[tuple[str, tuple[str, ...]]] = LAYERS,
    boundaries: dict[str, tuple[str, ...]] = BOUNDARIES,
    function_level_allowed: tuple[tuple[str, str], ...] = FUNCTION_LEVEL_ALLOWED,
) -> list[Violation]:
    """Every violation of the rules: cycles, unplaced modules, then each import's, in module order."""
    problems: list[Violation] = []
    for members, path in _cycles(graph):
        hops = " -> ".join([path[0].source] + [edge.label() for edge in path])
        among = f" (one of the cycles among {', '.join(members)})" if len(members) > len(path) else ""
        problems.append(Violation("cycle", hops + among, tuple(path)))
    layered = {entry.split(".")[0] for _, entries in layers for entry in entries}
    for module in sorted(graph.modules):
        if module.split(".")[0] in layered and layer_of(module, layers) is None:
            problems.append(Violation("unplaced",
                                      f"{module} is in no layer: add it to LAYERS in bench/import_graph.py"))
    for edge in sorted(graph.edges, key=lambda edge: (edge.source, edge.line, edge.target)):
        source_top, target_top = edge.source.split(".")[0], edge.target.split(".")[0]
        if target_top in boundaries.get(source_top, ()):
            problems.append(Violation("boundary", f"{source_top} must not import {target_top}: "
                                                  f"{_where(edge)} imports {edge.label()}", (edge,)))
            continue
        source_layer, target_layer = layer_of(edge.source, layers), layer_of(edge.target, layers)
        if source_layer is not None and target_layer is not None and target_layer < source_layer:
            problems.append(Violation("upward", f"{_where(edge)} [{layers[source_layer][0]}] imports "
                                                f"{edge.label()} [{layers[target_layer][0]}]", (edge,)))
        if edge.function_level and not edge.type_checking and not any(
                (not importer or _under(edge.source, importer)) and _under(edge.target, imported)
                for importer, imported in function_level_allowed):
            problems.append(Violation("function-level", f"{_where(edge)} imports {edge.target} inside a function "
                                                        "(move it to the module's top; see FUNCTION_LEVEL_ALLOWED)",
                                      (edge,)))
    return problems


# --------------------------------------------------------------------------- output
def render_text(graph: Graph, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> str:
    lines = []
    for module in sorted(graph.modules):
        index = layer_of(module, layers)
        where = f" ({layers[index][0]})" if index is not None else ""
        lines.append(f"{module}{where}")
        for edge in sorted(graph.edges_from(module), key=lambda edge: edge.target):
            lines.append(f"  -> {edge.label()}")
    return "\n".join(lines)


def render_dot(graph: Graph, problems: list[Violation]) -> str:
    """Graphviz: dashed = function-level or dynamic, dotted = TYPE_CHECKING, red = in a violation."""
    bad = {edge for problem in problems for edge in problem.edges}
    lines = ["digraph imports {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
    for module in sorted(graph.modules):
        lines.append(f'  "{module}";')
    for edge in sorted(graph.edges, key=lambda edge: (edge.source, edge.target, edge.line)):
        style = "dotted" if edge.type_checking else "dashed" if edge.function_level or edge.dynamic else "solid"
        color = ', color="red"' if edge in bad else ""
        lines.append(f'  "{edge.source}" -> "{edge.target}" [style={style}{color}];')
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="repository root (default: this script's repository)")
    parser.add_argument("--dot", action="store_true", help="print the graph in Graphviz dot (violations in red)")
    parser.add_argument("--quiet", action="store_true", help="print only the violations")
    options = parser.parse_args(argv)
    try:
        graph = build_graph(options.root)
    except (SyntaxError, UnicodeDecodeError) as exc:
        print(f"import_graph: cannot read {getattr(exc, 'filename', '') or exc}: {exc}", file=sys.stderr)
        return 2
    if not graph.modules:
        print(f"import_graph: no Python modules under {options.root}/{{{','.join(PACKAGES)}}}", file=sys.stderr)
        return 2
    problems = check(graph)
    if options.dot:
        print(render_dot(graph, problems))
    elif not options.quiet:
        print(render_text(graph))
        print()
    if problems:
        print(f"{len(problems)} import rule violation(s):", file=sys.stderr if options.dot else sys.stdout)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr if options.dot else sys.stdout)
        return 1
    if not options.dot:
        print(f"{len(graph.modules)} modules, {len(graph.edges)} imports: no violations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
