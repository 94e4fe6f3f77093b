"""The package's shape, read with ``ast`` only (pctune is never imported here).

* no import cycles between pctune's modules;
* the layering: the engine (``pctune.pc``) and the tracking layer do not reach up into the search,
  the pipeline (which holds the promotion) or the evaluations; the engine needs nothing of pctune but itself and
  ``pctune.errors`` (and neither Ray nor MLflow); the model zoo does not reach into the search,
  evaluations, tracking or pipeline; the measurement layer (``pctune.measure``, shared by the search's
  objectives and the promotion stages) imports none of the search, evaluations, pipeline,
  tracking or command line (nor Ray or MLflow); the search imports of ``pctune.evaluate`` only its
  settings tables (``pctune.evaluate.settings``), never a stage runner; only the command lines import
  ``pctune.cli``;
* size limits: no module over 400 lines, no function or method over 80.

An import edge goes from the importing module to the module the statement names: ``import a.b`` and
``from a.b import c`` name ``a.b``, except that ``from a.b import c`` names ``a.b.c`` when that is a
module; a name that is not a module resolves to the longest dotted prefix that is one (so
``import pctune.a.b`` with ``b`` a function is an edge to ``pctune.a``, and a module that imports
its own package's ``__init__`` has an edge to it). Every import statement counts: module level,
inside functions, under ``if TYPE_CHECKING``. Relative imports are resolved against the importer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pctune"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


# -- reading the package ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # a module of the package, or the dotted name as written for anything else
    internal: bool  # target is one of the package's modules
    line: int

    def where(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.target}"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (``pkg/a/__init__.py`` is ``pkg.a``)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]  # a plain module's relative imports start from its package
    if level > 1:
        if level - 1 > len(base) - 1:
            raise ValueError(f"{importer}: relative import beyond the top-level package")
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _longest_module(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, importer: str, path: Path,
             modules: dict[str, Path]) -> Iterable[tuple[str, bool]]:
    """(target, internal) for every name one import statement brings in."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            found = _longest_module(alias.name, modules)
            yield (found, True) if found else (alias.name, False)
        return
    base = (_resolve_relative(importer, _is_package(path), node.level, node.module) if node.level
            else node.module or "")
    for alias in node.names:
        if alias.name != "*" and f"{base}.{alias.name}" in modules:
            yield f"{base}.{alias.name}", True
            continue
        found = _longest_module(base, modules)
        yield (found, True) if found else (base, False)


def read_imports(package: Path) -> tuple[dict[str, Path], list[Import]]:
    """Every module of ``package`` and every import statement in it, resolved."""
    modules = module_names(package)
    imports = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target, internal in _targets(node, name, path, modules):
                    imports.append(Import(name, target, internal, node.lineno))
    # `from m import a, b`: one record per statement and module; in file order (ast.walk is breadth first)
    return modules, sorted(set(imports), key=lambda i: (i.importer, i.line, i.target))


def import_graph(modules: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports:
        if imp.internal and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


# -- cycles ----------------------------------------------------------------------------------------
def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def _shortest_cycle_through(graph: dict[str, set[str]], start: str, allowed: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside ``allowed`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child in allowed and child not in seen:
                    seen.add(child)
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a component of 2+ modules


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per group of mutually importing modules, as [a, b, ..., a]; empty when acyclic."""
    cycles = []
    for component in strongly_connected(graph):
        if len(component) > 1 or component[0] in graph.get(component[0], ()):
            cycles.append(_shortest_cycle_through(graph, component[0], set(component)))
    return cycles


def format_cycle(cycle: list[str]) -> str:
    return " -> ".join(cycle)


# -- layering rules --------------------------------------------------------------------------------
def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


UPPER_LAYERS = ("pctune.search", "pctune.pipeline", "pctune.evaluate")
#: what the measurement layer sits below: it measures for the search and the stages and imports none of them
ABOVE_MEASURE = (*UPPER_LAYERS, "pctune.tracking", "pctune.cli")
#: the one module of pctune.evaluate the search may import: the stage settings tables, not a stage runner
SEARCH_MAY_IMPORT_FROM_EVALUATE = "pctune.evaluate.settings"


def layering_violations(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        src, dst = imp.importer, imp.target
        if imp.internal:
            if _within(src, "pctune.tracking", "pctune.pc") and _within(dst, *UPPER_LAYERS):
                problems.append(f"{imp.where()}: tracking and pc must not import {', '.join(UPPER_LAYERS)}")
            if _within(src, "pctune.pc") and not _within(dst, "pctune.pc", "pctune.errors"):
                problems.append(f"{imp.where()}: pc may import only pctune.pc and pctune.errors")
            if _within(src, "pctune.models") and _within(
                    dst, "pctune.search", "pctune.evaluate", "pctune.tracking", "pctune.pipeline"):
                problems.append(f"{imp.where()}: models must not import search, evaluate, tracking or pipeline")
            if _within(src, "pctune.measure") and _within(dst, *ABOVE_MEASURE):
                problems.append(f"{imp.where()}: measure must not import {', '.join(ABOVE_MEASURE)}")
            if (_within(src, "pctune.search") and _within(dst, "pctune.evaluate")
                    and not _within(dst, SEARCH_MAY_IMPORT_FROM_EVALUATE)):
                problems.append(f"{imp.where()}: the search may import of pctune.evaluate only "
                                f"{SEARCH_MAY_IMPORT_FROM_EVALUATE} (measurements are in pctune.measure)")
            if _within(dst, "pctune.cli") and not _within(src, "pctune.cli", "pctune.search.cli"):
                problems.append(f"{imp.where()}: only pctune.cli and pctune.search.cli may import pctune.cli")
        elif _within(src, "pctune.pc", "pctune.measure") and _within(dst, "ray", "mlflow"):
            problems.append(f"{imp.where()}: the engine and the measurement layer must not depend on ray or mlflow")
    return problems


# -- sizes -----------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def long_modules(modules: dict[str, Path], limit: int = MAX_MODULE_LINES) -> list[str]:
    out = []
    for name, path in modules.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{_shown(path)} ({name}): {lines} lines > {limit}")
    return out


def _functions(tree: ast.AST, prefix: str = "") -> Iterable[tuple[str, ast.AST]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_functions(modules: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions and methods longer than ``limit`` lines (from ``def`` to the last line, docstring
    included, decorators not)."""
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for qualname, node in _functions(tree):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append(f"{name}.{qualname} ({_shown(path)}:{node.lineno}): {lines} lines > {limit}")
    return out


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package():
    return read_imports(PACKAGE)


def test_the_import_graph_is_read(package):
    """Guards the other tests against a reader that silently finds nothing."""
    modules, imports = package
    graph = import_graph(modules, imports)
    assert {"pctune", "pctune.pc", "pctune.cli", "pctune.search", "pctune.models", "pctune.measure"} <= set(modules)
    assert len(modules) >= 30
    assert sum(len(v) for v in graph.values()) >= 50
    assert "pctune.errors" in graph["pctune"]  # `from pctune.errors import PctuneError` in __init__
    assert any(i.importer.startswith("pctune.pc") and i.target == "torch" for i in imports)


def test_no_import_cycles(package):
    cycles = find_cycles(import_graph(*package))
    assert not cycles, "import cycles:\n" + "\n".join(format_cycle(c) for c in cycles)


def test_layering(package):
    problems = layering_violations(package[1])
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_no_module_over_400_lines(package):
    found = long_modules(package[0])
    assert not found, "modules over the limit:\n" + "\n".join(found)


def test_no_function_over_80_lines(package):
    found = long_functions(package[0])
    assert not found, "functions over the limit:\n" + "\n".join(found)


# -- the checks themselves can fail -----------------------------------------------------------------
def test_cycle_finder_on_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"d"}}
    cycles = find_cycles(graph)
    assert [format_cycle(c) for c in cycles] == ["a -> b -> c -> a", "e -> f -> e"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # the shortest cycle is reported, not a long way round
    assert find_cycles({"a": {"b", "x"}, "x": {"y"}, "y": {"a"}, "b": {"a"}}) == [["a", "b", "a"]]


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_reader_resolves_relative_function_level_and_name_imports(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from pkg.a.x import f\n",
        "pkg/a/x.py": "def f():\n    from .. import b\n    return b\n",  # in a function; b is a module
        "pkg/b.py": "import os\nfrom pkg.a import f\n",  # f is a name: an edge to pkg.a's __init__
        "pkg/c.py": "import pkg.a.x.f\nfrom .a import x\nfrom . import b as bee\nfrom .b import os\n",
    })
    modules, imports = read_imports(pkg)
    assert import_graph(modules, imports) == {
        "pkg": set(), "pkg.a": {"pkg.a.x"}, "pkg.a.x": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a.x", "pkg.b"}}
    assert [(i.importer, i.target) for i in imports if not i.internal] == [("pkg.b", "os")]


def test_reader_finds_cycles_through_package_inits(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from pkg.a.x import f\n",
        "pkg/a/x.py": "def f():\n    from ..b import g\n    return g\n",
        "pkg/b.py": "from pkg.a import f\n\ndef g():\n    return f\n",
        "pkg/d/__init__.py": "from .y import h\n",
        "pkg/d/y.py": "from pkg.d import CONSTANT\n\ndef h():\n    return CONSTANT\n",  # its own package's __init__
    })
    cycles = find_cycles(import_graph(*read_imports(pkg)))
    assert [format_cycle(c) for c in cycles] == ["pkg.a -> pkg.a.x -> pkg.b -> pkg.a", "pkg.d -> pkg.d.y -> pkg.d"]


def test_layering_and_size_checks_flag_offenders(tmp_path):
    imports = [
        Import("pctune.pc.network", "pctune.models.spec", True, 1),
        Import("pctune.pc.network", "ray", False, 2),
        Import("pctune.pc.network", "pctune.errors", True, 3),
        Import("pctune.pc.split", "mlflow.tracking", False, 4),
        Import("pctune.tracking.store", "pctune.search.results", True, 5),
        Import("pctune.tracking.store", "pctune.pc", True, 6),
        Import("pctune.models.registry", "pctune.evaluate", True, 7),
        Import("pctune.models.registry", "pctune.pc.network", True, 8),
        Import("pctune.search.driver", "pctune.cli", True, 9),
        Import("pctune.search.cli", "pctune.cli", True, 10),
        Import("pctune.search.driver", "ray", False, 11),
        Import("pctune.measure.gradcam", "pctune.evaluate.explain", True, 12),
        Import("pctune.measure.masks", "pctune.search.job", True, 13),
        Import("pctune.measure.images", "pctune.tracking.store", True, 14),
        Import("pctune.measure", "pctune.pipeline", True, 15),
        Import("pctune.measure.corruptions", "pctune.cli", True, 16),
        Import("pctune.measure.corruptions", "pctune.evaluate.stages", True, 17),
        Import("pctune.measure.gradcam", "ray.util", False, 18),
        Import("pctune.measure.gradcam", "pctune.pc.network", True, 19),
        Import("pctune.measure.gradcam", "pctune.data.folders", True, 20),
        Import("pctune.measure.gradcam", "captum.attr", False, 21),
        Import("pctune.search.cam", "pctune.evaluate.explain", True, 22),
        Import("pctune.search.prepare", "pctune.evaluate.stages", True, 23),
        Import("pctune.search", "pctune.evaluate", True, 24),  # the package's __init__ is no settings table
        Import("pctune.search.job", "pctune.evaluate.settings", True, 25),
        Import("pctune.search.cam", "pctune.measure.gradcam", True, 26),
        Import("pctune.evaluate.stages", "pctune.measure.masks", True, 27),
    ]
    problems = layering_violations(imports)
    assert [int(p.split("(line ")[1].split(")")[0]) for p in problems] == [
        1, 2, 4, 5, 7, 9, 12, 13, 14, 15, 16, 16, 17, 18, 22, 23, 24]
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/m.py": f"class C:\n    def big(self):\n{body}\n\n\n"
                                                                "def small():\n    return 1\n"})
    modules = module_names(pkg)
    found = long_functions(modules, 80)
    assert len(found) == 1 and found[0].startswith("pkg.m.C.big (") and found[0].endswith(": 81 lines > 80")
    assert long_functions(modules, 81) == []
    assert long_modules(modules, 86) == []
    assert [s.split(" ")[0] for s in long_modules(modules, 85)] == [str(pkg / "m.py")]
