"""The registry survives a crash (issue #28): the champion rule tags before it moves the alias, so a kill at any
point leaves what a retry completes; runs a killed process left RUNNING end as KILLED at the next start, and the
versions they registered without scores are marked abandoned. Each with a real SIGKILL."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

_KILL_AT = """
import os, signal, sys
import tasks.registry as registry
from mlflow import MlflowClient

model, where = sys.argv[1], sys.argv[2]
owner, name = (MlflowClient, "set_registered_model_alias") if where == "after the alias" else (registry, "tag_version")
real = getattr(owner, name)

def then_killed(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(owner, name, then_killed)
registry.apply_champion_rule(model, "2", 0.8, 0.005, lambda uri: 0.7)
"""

_KILLED_STAGE = """
import os, signal
from mlflow import MlflowClient
from ssl_lib.config import PipelineParams
from tasks.tracking import stage_run

with stage_run("self_train", PipelineParams()) as run_id:
    client = MlflowClient()
    client.create_registered_model("m")
    client.create_model_version("m", source="file:///nowhere", run_id=run_id)  # registered, then killed
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An MLflow store of this module's, for this process and the ones it starts (created once: it takes seconds);
    each test registers its own model."""
    import mlflow

    root = tmp_path_factory.mktemp("store")
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        for key in ("SSLPIPE_PARENT_RUN_ID", "DVC_EXP_NAME"):
            patch.delenv(key, raising=False)
        patch.setenv("SSLPIPE_ROOT", str(root))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")  # as experiment_id() sets it, for MlflowClient()
        yield root
    mlflow.set_tracking_uri(before)


def _run(script: str, *args: str) -> int:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}).returncode


@pytest.mark.parametrize("where", ["after the tags", "after the alias"])
def test_a_kill_inside_the_champion_rule_leaves_what_a_retry_completes(store: Path, where: str):
    from mlflow import MlflowClient

    from tasks.registry import DECISION_TAG, apply_champion_rule, champion_version

    client = MlflowClient()
    model = f"rule-{where.split()[-1]}"
    client.create_registered_model(model)
    for _ in range(2):
        client.create_model_version(model, source="file:///nowhere")
    apply_champion_rule(model, "1", 0.7, 0.005, lambda uri: 0.0)
    assert _run(_KILL_AT, model, where) == -9
    decided = client.get_model_version(model, "2").tags[DECISION_TAG]  # written before the alias could move
    assert decided.startswith("promoted: v2 0.8000 beats champion v1 0.7000")
    assert str(champion_version(model).version) == ("2" if where == "after the alias" else "1")

    retry = apply_champion_rule(model, "2", 0.8, 0.005, lambda uri: 0.7)
    assert str(champion_version(model).version) == "2"
    assert client.get_model_version(model, "2").tags[DECISION_TAG] == decided
    if where == "after the alias":  # the retry finds it champion already, and says how it became one
        assert retry.text.startswith("unchanged: v2 is the champion") and f"champion as {decided}" in retry.text
    else:
        assert retry.text == decided


def test_runs_a_killed_stage_left_running_end_as_killed_at_the_next_start(store: Path):
    from mlflow import MlflowClient

    from ssl_lib.config import PipelineParams
    from tasks.registry import STATUS_TAG
    from tasks.tracking import experiment_id, open_parent_run, owner_tags

    assert _run(_KILLED_STAGE) == -9
    client = MlflowClient()
    exp = experiment_id()
    left = client.search_runs([exp], filter_string="attributes.status = 'RUNNING'")
    assert len(left) == 2  # the stage's run and the parent it opened
    alive = client.create_run(exp, tags=owner_tags())  # this process's: still in progress

    open_parent_run(PipelineParams(), invocation="the-next-run", owner="prefect")
    statuses = {run.info.run_id: run.info.status for run in client.search_runs([exp])}
    assert all(statuses[run.info.run_id] == "KILLED" for run in left)
    assert statuses[alive.info.run_id] == "RUNNING"
    orphan = client.get_model_version("m", "1")
    assert orphan.tags[STATUS_TAG] == "abandoned" and "killed before the evaluate stage" in orphan.description
