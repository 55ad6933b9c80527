"""No import cycles among fastlb's modules, read from the source (nothing is imported).

Every import counts: at module level, inside a function (imported at run time) and under
`if TYPE_CHECKING:` (a cycle hidden from the interpreter is still one a reader has to untangle). The
Cython sources count too (.pyx, .pxd: their imports and cimports, read line by line since `ast` cannot
parse them): a module that cimports an extension type imports the type's module when it starts, so
protocol.pxd's `cimport HttpRuntime` makes fastlb.http.protocol import fastlb.http.runtime.
"""
import ast
import re
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


# `from a.b cimport X`, `from a.b import X`, `cimport a.b`, `import a.b` at a line's start (Cython)
CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\s+\(?([\w, ]*)|c?import\s+([\w.]+))", re.M)


def cython_imported_names(text: str) -> set[str]:
    """What a .pyx / .pxd file imports and cimports, `from X cimport Y` giving both X and X.Y."""
    names = set()
    for match in CYTHON_IMPORT.finditer(text):
        source, imported, module = match.groups()
        if module:
            names.add(module)
        else:
            names.add(source)
            names.update(f"{source}.{name.strip()}" for name in imported.split(",") if name.strip())
    return names


def import_graph(root: Path = SOURCE) -> dict[str, set[str]]:
    """module -> the fastlb modules it imports (a module's .py, .pyx and .pxd together)."""
    sources: dict[str, list[Path]] = {}
    for pattern in ("*.py", "*.pyx", "*.pxd"):
        for path in root.rglob(pattern):
            sources.setdefault(module_name(path, root), []).append(path)
    graph = {}
    for module, paths in sources.items():
        names = set()
        for path in paths:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".py":
                names |= imported_names(ast.parse(text, str(path)), module, path.name == "__init__.py")
            else:
                names |= cython_imported_names(text)
        graph[module] = {name for name in names if name in sources and name != module}
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
    relative import is found, and one made of a Cython cimport; a graph without one passes."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from fastlb.sub import b\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n")
    (package / "sub" / "c.py").write_text("import fastlb.a\n")
    (package / "d.py").write_text("from fastlb import a\n")
    (package / "e.pyx").write_text("")
    graph = import_graph(package)
    assert graph["fastlb.a"] == {"fastlb.sub", "fastlb.sub.b"}
    assert cycles(graph) == [["fastlb.a", "fastlb.sub.b", "fastlb.sub.c", "fastlb.a"]]
    (package / "sub" / "c.py").write_text("import os\n")
    assert cycles(import_graph(package)) == []
    (package / "e.pxd").write_text("from libc.stdint cimport uint32_t\nfrom fastlb.d cimport D\n")
    (package / "a.py").write_text("import fastlb.e\n")
    assert cycles(import_graph(package)) == [["fastlb.a", "fastlb.e", "fastlb.d", "fastlb.a"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in fastlb/:\n" + "\n".join(" -> ".join(cycle) for cycle in found)
