"""The package's import graph: no cycles, counting function-local imports too (so none of them is
there to dodge one), and the run directory sits below training, evaluation and analysis."""

from __future__ import annotations

import ast
from pathlib import Path

import moelab

SRC = Path(moelab.__file__).resolve().parent.parent


def module_imports(local: bool = False) -> dict[str, set[str]]:
    """``module → moelab modules it imports`` at import time (``local``: or inside a function),
    including the packages whose ``__init__`` runs on the way (``a.b.c`` imports ``a.b`` first)."""
    paths = {}
    for p in (SRC / "moelab").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree) if local else tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        deps = set()
        for t in targets:
            parts = t.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {d for d in deps if d in paths and d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_cycle() -> None:
    graph = module_imports(local=True)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d) :] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_rundir_sits_below_train_eval_and_analysis() -> None:
    graph = module_imports()
    seen, todo = set(), ["moelab.rundir"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    above = {m for m in seen if m.split(".")[1] in ("train", "eval", "analysis", "commands")}
    assert not above, f"moelab.rundir imports {sorted(above)}"
