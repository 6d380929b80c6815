"""The import-layer contract, read from the source: the torch-free side (what a line PC installs)
imports nothing of the training side, not even lazily inside a function, and the package's
imports form no cycle. A fresh-interpreter test (test_runtime) proves the same at run time for
the paths it runs; this one covers every import statement, run or not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moleflow_edge"
TORCH_FREE = (
    "moleflow_edge.runtime",
    "moleflow_edge.serving",
    "moleflow_edge.calibration",
    "moleflow_edge.contract",
    "moleflow_edge.targets",
    "moleflow_edge.signing",
    "moleflow_edge.errors",
)
TRAINING_SIDE = ("moleflow_edge.model", "moleflow_edge.detectors", "moleflow_edge.export", "torch", "torchvision")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, nested: bool = True) -> set[str]:
    """The modules the file's import statements name: all of them, or with nested=False only
    those at its top level (run when the module is imported)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree) if nested else tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_torch_free_side_imports_nothing_of_the_training_side() -> None:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = _graph()
    offenders: dict[tuple[str, str], str] = {}
    for start in (m for m in modules if _within(m, TORCH_FREE)):
        seen, stack = {start}, [start]
        while stack:
            current = stack.pop()
            for imported in _imports(modules[current]):
                if _within(imported, TRAINING_SIDE):
                    offenders.setdefault((current, imported), start)
            for nxt in graph[current] - seen:
                seen.add(nxt)
                stack.append(nxt)
    lines = [f"{who} imports {what} (reached from {start})" for (who, what), start in sorted(offenders.items())]
    assert not offenders, "\n".join(lines)


def test_the_package_imports_form_no_cycle() -> None:
    """Only imports a module runs when it is imported (top level, not inside functions) count:
    those are the ones that can deadlock an import; a lazy import inside a function is how a
    layer reaches up on purpose (the CLI's commands)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        top = _imports(path, nested=False)
        graph[name] = {m for m in top if m in modules and m != name and not name.startswith(m + ".")}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
