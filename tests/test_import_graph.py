"""No import cycle runs through the configuration, the shared constants or TLS: they are read by every
layer and must not depend back on one (config once imported tls for a dataclass, and admission, which
imports discovery, which imports config). Every import counts, inside functions too; only those under
`if TYPE_CHECKING:` do not (they never run). Importing a.b.c also runs a and a.b. Cython's cimports
count as well (a cimported extension type's module is imported when the importing module starts)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "fastlb"
LEAVES = ("fastlb.config", "fastlb.constants", "fastlb.tls")   # and the modules of fastlb/config/


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


CIMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\b|c?import\s+([\w.]+))", re.M)


def imported(path: Path) -> list[str]:
    """The modules a .py file imports (and the names it imports from them, which may be modules), or a
    .pyx / .pxd file imports and cimports."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return [m.group(1) or m.group(2) for m in CIMPORT.finditer(text)]
    tree = ast.parse(text)
    skipped = {id(sub) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
    targets = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return targets


def import_graph() -> dict[str, set[str]]:
    sources: dict[str, list[Path]] = {}
    for path in (*ROOT.rglob("*.py"), *ROOT.rglob("*.pyx"), *ROOT.rglob("*.pxd")):
        sources.setdefault(module_name(path), []).append(path)

    def resolve(target: str) -> str | None:
        while target and target not in sources:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, files in sources.items():
        edges = set()
        for path in files:
            for target in filter(None, map(resolve, imported(path))):
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # a.b.c runs a.b first (fastlb itself: the core)
                    dependency = ".".join(parts[:i])
                    if dependency in sources and dependency != name and not name.startswith(dependency + "."):
                        edges.add(dependency)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
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
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "fastlb.config.specs" in graph["fastlb.tls"]
    assert "fastlb.config.schema" in graph["fastlb.config.loader"]
    assert "fastlb.config" in graph["fastlb.pool"]


def test_no_cycle_through_config_constants_or_tls():
    through = [c for c in cycles(import_graph()) if any(m.startswith(LEAVES) for m in c)]
    assert not through, through


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
