"""The import graph of the gpconv package, read from the source with ``ast``: every import
statement, the ones inside functions too.

    python tests/import_graph.py            # modules by subpackage, their gpconv imports, cycles
    python tests/import_graph.py --local    # the function-local imports and the reason beside each

tests/test_architecture.py asserts on it: no cycle, few function-local imports (each with its
reason), every module small.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpconv"


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported gpconv module, dotted (the most specific module that exists)
    line: int
    local: bool  # inside a function
    text: str  # the source line, for reasons in comments


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports() -> list[Import]:
    known = modules()
    out = []
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        local_nodes = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        local_nodes.add(id(node))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in known else base)
            for t in targets:
                while t and t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in known and t != mod and t.startswith("gpconv"):
                    out.append(Import(mod, t, node.lineno, id(node) in local_nodes, lines[node.lineno - 1]))
    return out


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    edges = imports()
    if "--local" in argv:
        for e in edges:
            if e.local:
                print(f"{e.source}:{e.line}: {e.text.strip()}")
        return 0
    by_source: dict[str, list[str]] = {}
    for e in edges:
        by_source.setdefault(e.source, [])
        if e.target not in by_source[e.source]:
            by_source[e.source].append(e.target)
    for mod, path in modules().items():
        n = len(path.read_text().splitlines())
        deps = ", ".join(sorted(by_source.get(mod, []))) or "-"
        print(f"{mod:38s} {n:4d} lines  -> {deps}")
    found = cycles(edges)
    print(f"\n{len(edges)} imports of gpconv modules, {sum(e.local for e in edges)} inside functions, "
          f"{len(found)} cycle(s)")
    for c in found:
        print("  cycle:", " <-> ".join(c))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
