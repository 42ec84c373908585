"""ssl_lib's modules import each other without a cycle, and each imports on its own.

The graph counts every import statement, lazy ones inside functions too: a cycle hidden behind a function-level
import still ties the two modules together, and breaks as soon as someone moves the import to the top. An
import of ``a.b.c`` runs the packages ``a`` and ``a.b`` first, but those edges are left out: a package that
imports its own modules (``ssl_lib.methods`` registering every method) is not a cycle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGE = "ssl_lib"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted((REPO / PACKAGE).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its import statements name (``from a import b`` names a.b if b is one)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in MODULES)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in MODULES:
                        edges.add(target)
                    elif base in MODULES:
                        edges.add(base)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    for start in sorted(graph):
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path, on_path = [start], {start}
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = todo.pop()
            if nxt in on_path:
                return [*path[path.index(nxt):], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(graph[nxt])))
                path.append(nxt)
                on_path.add(nxt)
    return None


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_ssl_lib_has_no_import_cycle():
    graph = import_graph()
    assert "ssl_lib.methods.base" in graph and "ssl_lib.errors" in graph["ssl_lib.config"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_each_module_imports_first():
    """Every module imported as the first of the package, in one interpreter (torch and the other third-party
    packages stay loaded between modules; the project's own are dropped, so each starts cold)."""
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'ssl_lib' or m.startswith('ssl_lib.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"modules that fail to import first:\n{out.stdout}{out.stderr}"
