"""fedlm's layers, checked from the source: the import graph (every `import`, at module level or
inside a function, except type-checking-only ones) has no cycle, and nothing below the server
and the client imports them (DESIGN.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import fedlm

ROOT = Path(fedlm.__file__).parent
BELOW_SERVER_AND_CLIENT = ("tasks", "channels", "privacy", "algorithms", "models", "data", "core")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The fedlm modules `path` imports: `import a.b`, `from a.b import c` (a.b, and a.b.c when
    that is a module), relative imports resolved; imports under `if TYPE_CHECKING:` skipped."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported]
            if imported not in state:
                cycle = visit(imported)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    # a few edges the code is known to have, so that a parser that finds nothing cannot pass
    assert "fedlm.server.global_model" in graph["fedlm.server.loop"]
    assert "fedlm.channels.base" in graph["fedlm.channels.secure"]
    assert "fedlm.core.strategies.base" in graph["fedlm.core.strategies"]  # a relative or absolute import
    assert "fedlm.privacy.secure_aggregation" in graph["fedlm.config"]  # imported inside a function: an edge
    assert "fedlm.protocol" not in graph["fedlm.gate"]  # imported for type checking only: none


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_fedlm_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_below_the_server_and_client_imports_them():
    offenders = [
        f"{module} imports {imported}"
        for module, imports in import_graph().items()
        if module.split(".")[1:2] and module.split(".")[1] in BELOW_SERVER_AND_CLIENT
        for imported in imports
        if imported.split(".")[:2] in (["fedlm", "server"], ["fedlm", "client"])
    ]
    assert not offenders, offenders
