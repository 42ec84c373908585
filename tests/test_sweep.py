"""A sweep is a grid of real DVC experiments, one MLflow run each, with a table and a plot."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from tests.helpers import make_project, run_cmd, use_project

pytestmark = pytest.mark.slow


def test_sweep_over_label_budgets_reuses_pretraining(tmp_path, prefect_server, monkeypatch):
    from mlflow import MlflowClient

    from flows.sweep import sweep

    project = make_project(tmp_path / "proj")
    use_project(project, monkeypatch)
    result = sweep(methods=["rotation"], labels_per_class=[2, 4], seeds=[0], root=str(project),
                   experiment="test-sweep")
    table = pd.read_csv(result["table"])
    assert list(table["labels_per_class"]) == [2, 4]
    assert table["ssl_accuracy"].between(0, 1).all() and table["baseline_accuracy"].between(0, 1).all()
    assert table["self_train_accuracy"].between(0, 1).all()  # the tests' params self-train with label propagation
    with open(result["plot"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    shown = run_cmd([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], project).stdout
    assert set(table["dvc_experiment"]) <= set(shown.split())
    # The workspace was left alone: temp runs never touch params.yaml.
    assert "labels_per_class: 5" in (project / "params.yaml").read_text()

    client = MlflowClient()
    exp = client.get_experiment_by_name("test-sweep")
    stages_by_point = {}
    for run_id, name in zip(table["mlflow_run_id"], table["dvc_experiment"], strict=True):
        point = client.get_run(run_id)
        assert point.info.status == "FINISHED" and "test_accuracy_ssl" in point.data.metrics
        # The run page describes the point: its result, the params that make it this point, its DVC experiment.
        description = point.data.tags["mlflow.note.content"]
        assert "test accuracy" in description and f"`{name}`" in description, description
        assert "data.labels_per_class=" in description, description
        children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        stages_by_point[name] = {r.data.tags["sslpipe.stage"] for r in children}
    first, second = table["dvc_experiment"]
    assert "pretrain" in stages_by_point[first]
    # Pretraining sees no labels: the second budget restored the encoder from DVC's run cache.
    assert "pretrain" not in stages_by_point[second] and "finetune" in stages_by_point[second]


def test_sweep_points_run_on_a_dask_cluster(tmp_path, prefect_server, monkeypatch):
    pytest.importorskip("prefect_dask")
    from prefect_dask import DaskTaskRunner

    from flows.sweep import sweep

    project = make_project(tmp_path / "proj", {"pretrain": {"epochs": 1}, "finetune": {"epochs": 2}})
    use_project(project, monkeypatch)
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 1, "processes": True})
    result = sweep.with_options(task_runner=runner)(methods=["rotation"], labels_per_class=[3], seeds=[1],
                                                    root=str(project), experiment="dask-sweep")
    table = pd.read_csv(result["table"])
    assert len(table) == 1 and 0 <= table.loc[0, "ssl_accuracy"] <= 1
