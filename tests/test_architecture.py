"""The package's shape: no import cycles (function-local imports included), a function-local
import of the project's own modules only where it keeps torch off the warm path (and says so),
and modules of a readable size."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vramcalc", "vramcalc_harness")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the shipped packages, by dotted name."""
    return {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement loads (submodules as such, else the package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Edges module -> project module it imports (anywhere in it, ``TYPE_CHECKING`` blocks
    aside), and every function-local import of a project module: (module, line, source line)."""
    modules = project_modules()
    graph: dict[str, set[str]] = defaultdict(set)
    deferred = []
    for module, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        skipped = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        local = {
            id(node)
            for func in ast.walk(tree)
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(func)
        }
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
                continue
            targets = set()
            for name in _imported(module, path.name == "__init__.py", node):
                if name in modules:
                    targets.add(name)
                elif name.rpartition(".")[0] in modules and isinstance(node, ast.ImportFrom):
                    targets.add(name.rpartition(".")[0])  # a name defined in that module
            targets.discard(module)
            graph[module] |= targets
            if targets and id(node) in local:
                lines = text.splitlines()
                deferred.append((module, node.lineno, lines[node.lineno - 1].strip()))
    return graph, deferred


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.add(tuple(sorted(component)))
    return found


def test_the_walker_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == {("a", "b", "c")}


def test_no_import_cycle():
    graph, _ = import_graph()
    assert cycles(graph) == set()


def test_no_private_name_crosses_a_module():
    """``from module import _name`` between the project's modules: a private helper that
    another module needs is public (or lives where both can reach it)."""
    modules = project_modules()
    crossing = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                private = [a.name for a in node.names if a.name.startswith("_")]
                crossing += [f"{module}: from {node.module} import {name}" for name in private]
    assert crossing == KNOWN_PRIVATE_IMPORTS


KNOWN_PRIVATE_IMPORTS: list[str] = []


#: numpy: 0.08 s to import, a third of a warm plan's 0.3 s target
HEAVY = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
    "matplotlib",
    "numpy",
)
#: function-local imports in the trace and run-simulation internals being rewritten (the step
#: driver and the recorders are merged there); each module's count, which may only shrink
KNOWN_DEFERRED = {
    "vramcalc.trace.recipe": 11,
    "vramcalc.trace.fakemodel": 7,
    "vramcalc.trace.steptrace": 5,
    "vramcalc.memory.slack": 4,
    "vramcalc.estimate": 1,  # Prepared.simulation
}
#: modules whose functions load their own project modules when called, and why (each such
#: import's comment block says so): the API, so that a warm ``vramcalc plan`` (the 0.3 s target
#: of issue 18) loads none of the other commands' modules (the report, the fits, serving)
PER_COMMAND_IMPORTS = {"vramcalc.api": "warm plan"}
MAX_LINES = 500
#: one faithful port (torch's CUDACachingAllocator); the memory seam and the step driver and
#: recipe traces being rewritten (the recorders' merge)
LONG_MODULES = {
    "vramcalc.memory.allocator",
    "vramcalc.estimate",
    "vramcalc.trace.recipe",
    "vramcalc.trace.steptrace",
}


def heavy_modules() -> set[str]:
    """Project modules whose import (at module level, transitively) imports torch or another
    library that takes seconds to import."""
    modules = project_modules()
    direct: dict[str, set[str]] = {}
    heavy = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for node in tree.body:
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    break
                if isinstance(sub, ast.Import):
                    names |= {a.name for a in sub.names}
                elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                    names |= {sub.module} | {f"{sub.module}.{a.name}" for a in sub.names}
        if any(name.split(".")[0] in HEAVY for name in names):
            heavy.add(module)
        direct[module] = {name for name in names if name in modules}
    grew = True
    while grew:
        grew = False
        for module, targets in direct.items():
            if module not in heavy and targets & heavy:
                heavy.add(module)
                grew = True
    return heavy


def test_a_function_local_import_keeps_torch_off_the_import_and_says_so():
    """A project module is imported inside a function only when it imports torch (or the like)
    at its top, and the import line (or the line above it) says so in a comment."""
    _, deferred = import_graph()
    heavy = heavy_modules()
    modules = project_modules()
    counts: dict[str, int] = {}
    wrong = []
    for module, line, source in deferred:
        if module in KNOWN_DEFERRED:
            counts[module] = counts.get(module, 0) + 1
            continue
        text = modules[module].read_text().splitlines()
        if module in PER_COMMAND_IMPORTS:
            why = PER_COMMAND_IMPORTS[module]
            if source.split()[1] not in modules or why not in modules[module].read_text():
                wrong.append(f"{module}:{line}: {source}")
            continue
        said = any(name in text[line - 1] or name in text[line - 2] for name in HEAVY)
        target = source.split()[1]
        targets = {target} | {
            f"{target}.{n.strip(' ,()')}" for n in source.split("import")[1].split(",")
        }
        if not (targets & heavy) or not said:
            wrong.append(f"{module}:{line}: {source}")
    assert wrong == []
    assert all(counts.get(m, 0) <= n for m, n in KNOWN_DEFERRED.items()), counts


def test_modules_are_of_a_readable_size():
    long = {
        module: len(path.read_text().splitlines())
        for module, path in project_modules().items()
        if module.startswith("vramcalc") and len(path.read_text().splitlines()) > MAX_LINES
    }
    assert set(long) <= LONG_MODULES, long
