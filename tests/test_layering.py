"""The package's layering, read from the source: no import cycle in ``dynamo_lite/``, and workers never reach
into the frontend's router (what they share with it lives in ``dynamo_lite.placement``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dynamo_lite"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The ``dynamo_lite`` modules that ``name`` imports, anywhere in it (functions and ``if TYPE_CHECKING:``
    blocks included: a cycle for the type checker is one for the reader too). A package's ``__init__`` that
    Python runs before a submodule is not counted."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")
                    up = up[: len(up) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in child.names:  # a submodule, else a name the module ``base`` defines
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_workers_do_not_import_the_router() -> None:
    """Not directly, nor through anything they import."""
    for start in (m for m in MODULES if m.startswith("dynamo_lite.worker")):
        seen, todo = {start}, [start]
        while todo:
            for m in GRAPH[todo.pop()]:
                assert not m.startswith("dynamo_lite.router"), f"{start} reaches {m}"
                if m not in seen:
                    seen.add(m)
                    todo.append(m)


def test_the_graph_is_read() -> None:
    """The checks above see real edges (a parser that found none would pass them)."""
    assert "dynamo_lite.placement.handoff" in GRAPH["dynamo_lite.placement.placement"]
    assert "dynamo_lite.placement" in GRAPH["dynamo_lite.worker.handlers"]
    assert "dynamo_lite.placement" in GRAPH["dynamo_lite.router.orchestrator"]
