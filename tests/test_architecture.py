"""The package's shape: no import cycles between moetrain's modules, at run time or file by file."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moetrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, here: str, is_package: bool, type_checking: bool = False) -> set[str]:
    """Modules an import names, at any depth (function-level imports too); under ``if TYPE_CHECKING`` only
    when ``type_checking``."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here.split(".") if is_package else here.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    """moetrain module -> the moetrain modules its imports execute.

    Importing ``a.b.c`` runs the package ``a.b``'s ``__init__`` first, so an
    import of a module in another package also depends on that package's
    ``__init__`` (a package's own modules importing each other do not).
    """
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        own_pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in _imported(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            if not target.startswith("moetrain"):
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod not in files or mod == name:
                    continue
                is_pkg = files[mod].name == "__init__.py"
                if i == len(parts) or (is_pkg and not own_pkg.startswith(mod)):
                    deps.add(mod)
        graph[name] = deps
    return graph


def file_graph() -> dict[str, set[str]]:
    """moetrain module -> the moetrain files any of its imports names (at any depth, ``TYPE_CHECKING`` ones
    included): for ``from a.b import c``, the module ``a.b.c`` when it is a file, else ``a.b``'s file.

    Stricter than :func:`import_graph`: a circle here runs at no import, but it still means two files that
    cannot be read, moved or tested one without the other.
    """
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for target in _imported(ast.parse(path.read_text()), name, path.name == "__init__.py", type_checking=True):
            parts = target.split(".")
            named = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files), None)
            if named is not None and named != name:
                deps.add(named)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (modules that import each other, directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_no_file_level_import_cycles():
    """Catches two files that name each other, directly or through others, in any import: a function-level one
    or one kept for type hints (``moe/dispatch.py`` naming ``parallel/all_to_all.py``'s ``CommStats`` while
    ``all_to_all.py`` imports the dispatcher contract was one)."""
    found = cycles(file_graph())
    assert not found, "files that import each other (any import, TYPE_CHECKING included):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_file_graph_counts_every_kind_of_import():
    """Catches a file graph that skips ``TYPE_CHECKING`` or function-level imports (and so passes the circle
    test vacuously): the real graph holds an edge of each kind, and a planted type-only import back is a cycle."""
    graph = file_graph()
    assert "moetrain.config" in graph["moetrain.moe.router"]  # a TYPE_CHECKING import
    assert "moetrain.moe.triton_gemm" in graph["moetrain.moe.dispatch"]  # a function-level import
    assert "moetrain.moe.dispatch" in graph["moetrain.parallel.all_to_all"]  # from a.b import (c, d): the file a.b
    planted = {**graph, "moetrain.moe.dispatch": graph["moetrain.moe.dispatch"] | {"moetrain.parallel.all_to_all"}}
    assert any({"moetrain.moe.dispatch", "moetrain.parallel.all_to_all"} <= set(c) for c in cycles(planted))
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import moetrain.tools.plan\n")
    assert "moetrain.tools.plan" in _imported(guarded, "moetrain.errors", False, type_checking=True)


def test_the_cycle_finder_finds_a_planted_cycle():
    """Catches a cycle finder (or an import-graph builder) that finds nothing: one import planted from a
    low-level module back to the trainer (through several packages), one function-level import, one relative
    import; each cycle is reported, and the real graph's edges are where they are expected."""
    graph = import_graph()
    assert "moetrain.config" in graph["moetrain.train.trainer"]  # the graph has the edges it should
    assert not cycles(graph)
    planted = {**graph, "moetrain.errors": graph["moetrain.errors"] | {"moetrain.train.trainer"}}
    found = cycles(planted)
    assert len(found) == 1 and {"moetrain.errors", "moetrain.train.trainer"} <= set(found[0]), found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    nested = ast.parse("def f():\n    from moetrain.train import trainer\n")
    assert "moetrain.train.trainer" in _imported(nested, "moetrain.errors", False)
    relative = ast.parse("from ..model import layers\n")
    assert "moetrain.model.layers" in _imported(relative, "moetrain.moe.routing", False)
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import moetrain.tools.plan\n")
    assert "moetrain.tools.plan" not in _imported(guarded, "moetrain.errors", False)


if __name__ == "__main__":
    for c in cycles(import_graph()) + cycles(file_graph()):
        print(" <-> ".join(c))
