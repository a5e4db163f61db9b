"""The shape of the code: no import cycle between the modules of ledger/, daemon/ and horse/, and no file too long
to read in one sitting. Read from the source with `ast` (nothing is imported): every import counts, at module
level, inside functions and under `if TYPE_CHECKING:`; `from pkg import name` is an edge to the module
`pkg.name` when that is a module, else to `pkg`. Lazy command tables (`ledger.cli.LAZY_COMMANDS`, strings) are
not imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ledger", "daemon", "horse")
MAX_LINES = 450
# Files over MAX_LINES today, each with the most it may hold until it is split (lower these, never raise them).
LONGER: dict[str, int] = {
    "horse/route.py": 500,      # copied verbatim into exports (daemon/export_routed.py)
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the modules of PACKAGES it imports (anywhere in its source)."""
    modules = _modules()

    def known(name: str | None) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.update(known(f"{source}.{alias.name}") for alias in node.names)
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    detail = ["; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in found]
    assert not found, "import cycles (break each by moving what both need into a lower module):\n" + "\n".join(detail)


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "ledger.store" in graph["ledger.cliapp"]       # imported inside AppContext.store
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_file_too_long():
    too_long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            n = len(path.read_text().splitlines())
            if n > LONGER.get(rel, MAX_LINES):
                too_long.append(f"{rel}: {n} lines > {LONGER.get(rel, MAX_LINES)}")
    assert not too_long, "split these into modules of one role each:\n" + "\n".join(too_long)


def test_every_package_is_in_the_wheel():
    """pyproject's `packages` lists every package directory (a subpackage missing there is missing from the wheel)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in (*PACKAGES, "migrations")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
