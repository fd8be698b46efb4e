"""The code's shape: no module of ddptrain imports another that (directly or not) imports it back, counting the
imports inside functions and under TYPE_CHECKING (a cycle there is a cycle of ideas, only deferred)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ddptrain"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The ddptrain modules that `path` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "ddptrain":  # from . import x / from ddptrain import x
                found.update(alias.name for alias in node.names)
            if node.module and (node.level == 1 or node.module.startswith("ddptrain.")):
                found.add(node.module.split(".")[-1] if node.level else node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ddptrain."))
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    return {path.stem: imported_modules(path, modules) for path in PACKAGE.glob("*.py")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_finder_reads_every_kind_of_import(tmp_path):
    (tmp_path / "one.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ddptrain.two import x\nif TYPE_CHECKING:\n    from ddptrain import three\n"
        "def f():\n    import ddptrain.four\n    from . import five\n    from .six import y\n")
    assert imported_modules(tmp_path / "one.py", {"one", "two", "three", "four", "five", "six", "seven"}) == {
        "two", "three", "four", "five", "six"}


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert len(graph) > 20 and graph["run"], "the package's modules were not found"
    assert cycles(graph) == []


def test_errors_is_a_leaf():
    """Every module raises these exceptions; the module that holds them must need none of the others."""
    assert import_graph()["errors"] == set()
