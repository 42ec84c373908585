"""dvc.yaml's code deps stay true as code moves: each stage lists exactly the project code it imports.

The import closure of ``tasks/<stage>.py`` (every import statement, lazy ones inside functions included,
followed through ``ssl_lib`` and ``tasks``) is compared with the stage's deps. Plumbing that records how a
run is tracked or validated, not what it computes, is left out on purpose (dvc.yaml's header says why).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

PACKAGES = ("ssl_lib", "tasks")
# How a run is configured, recorded and reported, never what it computes: not deps of any stage.
PLUMBING = {
    "ssl_lib/__init__.py", "ssl_lib/config.py", "ssl_lib/errors.py", "ssl_lib/device.py", "ssl_lib/progress.py",
    "ssl_lib/timing.py",  # clock reads for the history's seconds columns: how long, never what
    "ssl_lib/data/__init__.py", "ssl_lib/data/errors.py",  # a docstring; a re-export of ssl_lib.errors
    "tasks/__init__.py", "tasks/common.py", "tasks/environment.py", "tasks/paths.py", "tasks/tracking.py",
    "tasks/registry.py", "tasks/mlflow_pytorch.py", "tasks/run_summary.py",
}
# Listed as a dep, but what it imports is not followed: none, every listed module's imports are stage work.
NOT_FOLLOWED: set[str] = set()


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(file: Path) -> set[str]:
    """Project modules named by any import statement in ``file`` (``from a import b`` may name module a.b)."""
    package = ".".join(file.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES and _module_file(n) is not None}


def import_closure(start: Path) -> set[str]:
    """Repository-relative paths of every project file ``start`` imports, directly or not (with their packages)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        if str(file.relative_to(REPO)) in PLUMBING | NOT_FOLLOWED:
            continue  # what plumbing imports (e.g. the method registry, to validate a name) is not stage work
        for name in _imports(file):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                module = _module_file(".".join(parts[:i]))
                if module is not None:
                    todo.append(module)
    return {str(f.relative_to(REPO)) for f in seen}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_are_its_import_closure(stage: str):
    deps = [d for d in STAGES[stage]["deps"] if d.split("/")[0] in PACKAGES]
    closure = import_closure(REPO / "tasks" / f"{stage}.py")
    missing = sorted(p for p in closure - PLUMBING if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs this code but does not list it as a dep: {missing}"
    stale = sorted(d for d in deps if not any(_covered(p, [d]) for p in closure))
    assert not stale, f"dvc.yaml stage {stage!r} lists code it no longer imports: {stale}"
    plumbing_listed = sorted(d for d in deps if d in PLUMBING)
    assert not plumbing_listed, f"plumbing listed as a dep of {stage!r} (reruns it for nothing): {plumbing_listed}"


def test_the_closure_follows_lazy_imports():
    closure = import_closure(REPO / "tasks" / "pretrain.py")
    assert "ssl_lib/pretrain.py" in closure  # imported inside a function, not at the top
    assert "ssl_lib/methods/simclr.py" in closure  # through the methods package's registry
