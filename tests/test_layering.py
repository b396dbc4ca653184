"""The layering rule of docs/ARCHITECTURE.md, checked on the import graph (imports inside functions
included: they run too; `if TYPE_CHECKING:` imports excluded: they never run):

    cli  ->  api, bench  ->  client, server  ->  speculative, models, net  ->  base modules

A module imports from its own layer or the layers below, never above; client/ and server/ never
import each other (they meet only through net/); and no two modules import each other, directly
or around a circle."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsdnode"
LAYERS = [  # lowest first; a name is a top-level module or subpackage of dsdnode
    {"errors", "dtypes", "files", "ready", "config", "packaged", "devices"},
    {"speculative", "models", "net"},
    {"client", "server", "local_swarm"},
    {"api", "bench"},
    {"cli", "cli_common", "cli_options", "cli_generate", "cli_node", "cli_bench", "cli_demo", "cli_api", "__main__"},
]
APART = [("client", "server")]  # same layer, and neither may import the other
FACADE = "dsdnode"  # the package itself: __version__, and the library API re-exported lazily


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The dsdnode modules `path` imports at run time."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                 for n in ast.walk(block)}
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != me}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports(p, set(paths)) for m, p in paths.items()}


def layer_of(module: str) -> str:
    return module.split(".")[1] if module != FACADE else FACADE


def level(name: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if name in names)


def test_every_module_has_a_layer():
    unplaced = {layer_of(m) for m in import_graph()} - {FACADE} - set().union(*LAYERS)
    assert not unplaced, f"place these in LAYERS (and in docs/ARCHITECTURE.md's Layout): {sorted(unplaced)}"


def test_no_upward_imports():
    upward = []
    for module, deps in import_graph().items():
        if module == FACADE:
            continue
        for dep in deps:
            a, b = layer_of(module), layer_of(dep)
            if b != FACADE and (level(b) > level(a) or (a, b) in APART or (b, a) in APART):
                upward.append(f"{module} -> {dep}")
    assert sorted(upward) == []


def test_no_import_circles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                circles.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []
