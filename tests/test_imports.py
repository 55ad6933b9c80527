"""No import cycles among fastlb's modules, read from the source (nothing is imported).

Every import counts: at module level, inside a function (imported at run time) and under
`if TYPE_CHECKING:` (a cycle hidden from the interpreter is still one a reader has to untangle). Only
the Python sources are read (.py: the `ast` module cannot parse Cython); the compiled modules import
no fastlb Python module that imports them back.
"""
import ast
from pathlib import Path

PACKAGE = "fastlb"
SOURCE = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement of the module names, `from X import Y` giving both X and
    X.Y (Y may be a module or a name in X: `import_graph` keeps whichever is a module)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = SOURCE) -> dict[str, set[str]]:
    """module -> the fastlb modules it imports."""
    paths = {module_name(path, root): path for path in root.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        names = imported_names(tree, module, path.name == "__init__.py")
        graph[module] = {name for name in names if name in paths and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, each written as the path a -> b -> ... -> a: for every module caught in one,
    the shortest cycle through it (so each module of a tangle is named, and each cycle once)."""
    found = {}
    for component in _tangles(graph):
        for module in sorted(component):
            cycle = _shortest_cycle(graph, component, module)
            start = cycle.index(min(cycle[:-1]))           # written from its first module: found once
            cycle = cycle[start:-1] + cycle[:start + 1]
            found[tuple(cycle)] = cycle
    return sorted(found.values(), key=lambda cycle: (len(cycle), cycle))


def _tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest cycle through start inside its component (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in no cycle of {sorted(component)}")


def test_the_graph_sees_imports_of_every_kind(tmp_path):
    """The checker itself: a cycle made of a function-level import, a TYPE_CHECKING import and a
    relative import is found; a graph without one passes."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from fastlb.sub import b\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n")
    (package / "sub" / "c.py").write_text("import fastlb.a\n")
    (package / "d.py").write_text("from fastlb import a\n")
    graph = import_graph(package)
    assert graph["fastlb.a"] == {"fastlb.sub", "fastlb.sub.b"}
    assert cycles(graph) == [["fastlb.a", "fastlb.sub.b", "fastlb.sub.c", "fastlb.a"]]
    (package / "sub" / "c.py").write_text("import os\n")
    assert cycles(import_graph(package)) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in fastlb/:\n" + "\n".join(" -> ".join(cycle) for cycle in found)
