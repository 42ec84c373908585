"""No stage module imports another: what two stages share lives in ssl_lib (recipes) or in a non-stage helper
module of tasks/ (MLflow and DVC glue), so each stage's code is its own module plus what it lists in dvc.yaml.

Every import statement counts, lazy ones inside functions too (the stages import most things lazily).
"""
from __future__ import annotations

import ast

import pytest
import yaml

from tests.helpers import REPO

STAGES = sorted(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def stage_imports(source: str, stages: list[str]) -> set[str]:
    """The stage modules (``tasks.<stage>``) that ``source``'s import statements name."""
    modules = {f"tasks.{stage}" for stage in stages}
    named: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # In tasks/: `from . import x` and `from .x import y` name tasks.x as well.
            base = "tasks" + (f".{node.module}" if node.module else "") if node.level == 1 else node.module or ""
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in modules if any(name == module or name.startswith(module + ".") for name in named)}


def test_the_check_sees_every_form_of_import():
    stages = ["finetune", "evaluate"]
    assert stage_imports("def f():\n    from tasks.finetune import load\n", stages) == {"tasks.finetune"}
    assert stage_imports("import tasks.evaluate as e\n", stages) == {"tasks.evaluate"}
    assert stage_imports("from tasks import evaluate, paths\n", stages) == {"tasks.evaluate"}
    assert stage_imports("from .finetune import x\n", stages) == {"tasks.finetune"}
    assert stage_imports("from tasks import paths\nfrom tasks.finetuned import x\n", stages) == set()


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage: str):
    others = [s for s in STAGES if s != stage]
    found = stage_imports((REPO / "tasks" / f"{stage}.py").read_text(), others)
    assert not found, (f"tasks/{stage}.py imports the stage module(s) {sorted(found)}: move what they share into "
                       "ssl_lib (a recipe) or a non-stage module of tasks/, and list it in dvc.yaml")
