"""How the test modules are written: they import helpers from ``tests/helpers.py``, not from conftest, and change
the environment only through ``monkeypatch`` (undone after the test), never by writing ``os.environ``."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

# conftest sets the session's environment once, at collection, on purpose (offline switches, Prefect's home).
MODULES = sorted(p for p in (REPO / "tests").glob("*.py") if p.name != "conftest.py")


def _environ_writes(tree: ast.AST) -> list[int]:
    """Lines that assign, delete or mutate ``os.environ`` in place."""
    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
            [node.target] if isinstance(node, ast.AugAssign) else []
        if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_environ(node.func.value)
              and node.func.attr in ("update", "pop", "setdefault", "clear", "popitem")):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_a_test_module_changes_the_environment_only_through_monkeypatch(path: Path):
    lines = _environ_writes(ast.parse(path.read_text()))
    assert not lines, f"{path.name} writes os.environ at lines {lines}: use monkeypatch.setenv / delenv"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_a_test_module_imports_helpers_not_conftest(path: Path):
    tree = ast.parse(path.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "tests.conftest" not in imported, f"{path.name}: import helpers from tests.helpers"


def test_the_checks_see_a_write():
    assert _environ_writes(ast.parse("import os\nos.environ['A'] = '1'\nos.environ.pop('B')\n")) == [2, 3]
    assert _environ_writes(ast.parse("import os\nenv = {**os.environ, 'A': '1'}\nos.environ.get('A')\n")) == []


def _sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that change ``sys.path``: a call on it (insert, append, ...) or an assignment to it or an item of it."""
    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets):
                lines.append(node.lineno)
    return sorted(lines)


def test_no_module_edits_sys_path():
    # Scripts, benchmarks and test workers run as modules from the repository root (python -m), so every
    # import resolves to this checkout without a path hack.
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, check=True, capture_output=True,
                           text=True).stdout.split()
    found = {name: lines for name in files if (lines := _sys_path_edits(ast.parse((REPO / name).read_text())))}
    assert not found, f"sys.path edited (run the file with python -m from the repository root instead): {found}"


def test_the_sys_path_check_sees_an_edit():
    assert _sys_path_edits(ast.parse("import sys\nsys.path.insert(0, 'x')\nsys.path[0] = 'y'\nsys.path += ['z']\n")) \
        == [2, 3, 4]
    assert _sys_path_edits(ast.parse("import sys\nprint(sys.path)\nfrom os import path\npath.join('a')\n")) == []
