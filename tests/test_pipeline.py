"""End to end: a real Prefect flow run over real DVC stages, tracked in a real MLflow store, on digits."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import make_project, run_cmd, use_project

pytestmark = pytest.mark.slow

STAGES = ("ingest", "pseudo_labels", "pretrain", "finetune", "self_train", "evaluate")
# The conftest params have lp_epochs 2: the run's name must say that it differs.
FLOW_OVERRIDES = {"pretrain.method": "rotation", "finetune.lp_epochs": 3}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, prefect_server):
    project = make_project(tmp_path_factory.mktemp("pipeline") / "proj")
    with pytest.MonkeyPatch.context() as patch:  # the module's tests read its store; undone after the last
        use_project(project, patch)
        from flows.pipeline import ssl_pipeline

        summary = ssl_pipeline(overrides=FLOW_OVERRIDES, root=str(project))
        yield project, summary


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _experiment_id(client) -> str:
    return client.get_experiment_by_name("ssl-pipeline").experiment_id


def test_flow_runs_every_stage_and_writes_outputs(flow_run):
    project, summary = flow_run
    assert [s["stage"] for s in summary["stages"]] == list(STAGES)
    assert all(s["executed"] for s in summary["stages"])
    for rel in ("data/prepared/images.npy", "data/prepared/manifest.csv", "data/prepared/meta.json",
                "artifacts/pseudo_labels/targets.npz", "artifacts/pseudo_labels/preview.png",
                "artifacts/pretrain/encoder.pt", "artifacts/self_train/classifier.pt",
                "artifacts/self_train/pseudo_labels.csv", "artifacts/self_train/pseudo_labels.png",
                "results/per_class.csv", "results/confusion_ssl.png", "results/confusion_baseline.png",
                "results/confusion_final.png", "results/predictions.csv"):
        assert (project / rel).is_file(), rel
    metrics = json.loads((project / "results/metrics.json").read_text())
    for kind in ("ssl", "baseline", "self_train"):
        assert 0.0 <= metrics[kind]["accuracy"] <= 1.0
        assert 0.0 <= metrics[kind]["knn_accuracy"] <= 1.0
    # Digits has 10 classes: anything at chance level would mean the stages are not wired to real learning.
    assert metrics["pretrained_encoder_knn_accuracy"] > 0.3
    # The override was written into params.yaml, as `dvc exp run -S` would.
    assert yaml.safe_load((project / "params.yaml").read_text())["pretrain"]["method"] == "rotation"


def test_encoder_checkpoint_is_a_plain_state_dict(flow_run):
    import torch

    project, _ = flow_run
    state = torch.load(project / "artifacts/pretrain/encoder.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def test_mlflow_has_parent_with_nested_stage_runs(flow_run):
    project, summary = flow_run
    client = _client()
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sslpipe.method"] == "rotation"
    assert parent.data.tags.get("prefect.flow_run_id")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5s = {o["path"]: o["md5"] for o in lock["stages"]["ingest"]["outs"]}
    expected = hashlib.md5(f"{md5s['data/prepared/images.npy']}:{md5s['data/prepared/manifest.csv']}".encode())
    assert parent.data.tags["sslpipe.dataset_hash"] == expected.hexdigest()
    assert parent.data.params["pretrain.method"] == "rotation"
    assert "test_accuracy_ssl" in parent.data.metrics
    children = client.search_runs([_experiment_id(client)],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["sslpipe.stage"] for r in children) == sorted(STAGES)
    # The data, as an MLflow dataset (the runs table's Dataset column), on the parent and every stage reading it.
    inputs = parent.inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("digits v1", expected.hexdigest()[:8])]
    assert json.loads(inputs[0].dataset.profile)["splits"] == {"unlabeled": 1358, "labeled": 50, "val": 30,
                                                               "test": 359}
    for child in children:
        used = [d.dataset.name for d in client.get_run(child.info.run_id).inputs.dataset_inputs]
        assert used == ([] if child.data.tags["sslpipe.stage"] == "ingest" else ["digits v1"])
    pretrain = next(r for r in children if r.data.tags["sslpipe.stage"] == "pretrain")
    history = client.get_metric_history(pretrain.info.run_id, "pretrain_loss")
    assert len(history) == 2  # one point per epoch
    evaluate = next(r for r in children if r.data.tags["sslpipe.stage"] == "evaluate")
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"confusion_ssl.png", "per_class.csv"} <= artifacts


def test_mlflow_names_and_describes_the_run(flow_run):
    """The runs table tells runs apart by name; the run page says what happened; the experiment opens in the
    model-training view."""
    project, summary = flow_run
    client = _client()
    parent = client.get_run(summary["mlflow_run_id"])
    name = parent.info.run_name
    assert name == summary["mlflow_run_name"]
    assert name.startswith("rotation 5/class lp_epochs=3 · "), name  # method, label budget, the override
    metrics = json.loads((project / "results/metrics.json").read_text())
    description = parent.data.tags["mlflow.note.content"]
    assert f"test accuracy {metrics['self_train']['accuracy']:.4f}" in description, description
    assert "`finetune.lp_epochs=3`" in description and "`pretrain.method=rotation`" in description
    commit = run_cmd(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert f"Git commit: `{commit[:12]}`" in description
    assert "DVC ran ingest, pseudo_labels, pretrain, finetune, self_train, evaluate" in description
    assert summary["dvc_experiment"] in description
    assert "`test-classifier-digits` v1, promoted: first champion" in description
    assert parent.data.metrics["test_accuracy"] == metrics["self_train"]["accuracy"]  # the final model's, first
    assert "- Data: `digits v1` (" in description and "50 labeled, 30 val" in description
    # The parent run carries the results it stands for: metrics and the result files.
    assert {"per_class.png", "per_class.csv", "metrics.json", "confusion_final.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_plan_is_logged_before_compute_and_set_against_the_run(flow_run):
    """The plan (steps and estimated minutes per stage, from the probe) is on the parent run; the description
    and the flow's summary put the estimate next to the time taken, and say which candidate became the final
    model, chosen on val."""
    project, summary = flow_run
    client = _client()
    parent = client.get_run(summary["mlflow_run_id"])
    plan_path = client.download_artifacts(parent.info.run_id, "plan.json", str(project / "downloaded"))
    plan = json.loads(Path(plan_path).read_text())
    stages = {row["stage"]: row for row in plan["stages"]}
    assert stages["pretrain"]["steps"] > 0 and stages["pretrain"]["estimated_minutes"] is not None
    assert plan["data"]["height"] == 8 and plan["data"]["num_classes"] == 10
    assert parent.data.metrics["planned_minutes"] == pytest.approx(plan["estimated_total_minutes"])
    description = parent.data.tags["mlflow.note.content"]
    assert "min planned" in description and "min taken" in description, description
    final = json.loads((project / "artifacts/self_train/final.json").read_text())
    assert [c["name"] for c in final["candidates"]] == ["fine-tune", "round 1", "round 2"]
    from ssl_lib.self_train import choose_final

    chosen = [i for i, c in enumerate(final["candidates"]) if c["chosen"]]
    # The fine-tune's val accuracy counts less the optimism its fine-tuning measured; a round's counts as it is.
    teacher = json.loads((project / "artifacts/finetune/classifiers.json").read_text())
    assert final["candidates"][0]["val_optimism"] == round(teacher["val_optimism"]["ssl"], 4)
    assert [c["val_optimism"] for c in final["candidates"][1:]] == [0.0, 0.0]
    scores = [c["val_accuracy"] - c["val_optimism"] for c in final["candidates"]]
    assert chosen == [choose_final(scores, margin=0.03)]
    assert final["candidates"][chosen[0]]["name"] == final["final_model"]
    assert f"Final model: {final['final_model']}, of fine-tune" in description, description
    assert {row["stage"] for row in summary["plan"]} == {"pretrain", "finetune", "self_train", "evaluate"}


def test_stage_runs_log_their_histories_and_the_lp_phase(flow_run):
    import pandas as pd

    project, summary = flow_run
    client = _client()
    children = {r.data.tags["sslpipe.stage"]: r for r in client.search_runs(
        [_experiment_id(client)], filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")}
    pretrain = children["pretrain"].info.run_id
    assert {"history.csv", "encoder.json"} <= {a.path for a in client.list_artifacts(pretrain)}
    finetune = children["finetune"]
    assert [m.step for m in client.get_metric_history(finetune.info.run_id, "ssl_lp_val_acc")] == [1, 2, 3]
    assert not [key for key in finetune.data.metrics if key.endswith("_best")]  # a flag is no curve
    assert 1 <= int(finetune.data.tags["ssl.best_epoch"]) <= 4
    assert {"history_ssl.csv", "history_baseline.csv"} <= {a.path for a in client.list_artifacts(finetune.info.run_id)}
    # per_class.csv is wide: one row per class, each model's columns side by side.
    table = pd.read_csv(project / "results/per_class.csv")
    assert len(table) == 10 and table["class"].is_unique
    assert {"support", "baseline_f1", "ssl_f1", "self_train_f1", "ssl_recall"} <= set(table.columns)
    numbers = (project / "results/per_class.csv").read_text().replace(",", " ").split()
    assert max(len(n.split(".")[1]) for n in numbers if "." in n) <= 4  # rounded where people read
    assert (project / "results/per_class.png").read_bytes()[:4] == b"\x89PNG"


def test_logged_model_and_version_carry_the_scores(flow_run):
    import mlflow

    from tasks.registry import logged_model_id

    project, _ = flow_run
    metrics = json.loads((project / "results/metrics.json").read_text())
    version = _client().get_model_version("test-classifier-digits", "1")
    model_id = json.loads((project / "artifacts/self_train/final.json").read_text())["registered_model"]["model_id"]
    assert logged_model_id("test-classifier-digits", "1") == model_id
    logged = mlflow.get_logged_model(model_id)
    scores = {m.key: m.value for m in logged.metrics}
    assert scores["test_accuracy"] == pytest.approx(metrics["self_train"]["accuracy"])
    assert scores["macro_f1"] == pytest.approx(metrics["self_train"]["macro_f1"])
    assert scores["knn_accuracy"] == pytest.approx(metrics["self_train"]["knn_accuracy"])
    assert logged.params["method"] == "rotation" and logged.params["label_budget"] == "5/class"
    assert version.tags["method"] == "rotation" and version.tags["label_budget"] == "5/class"
    assert len(version.tags["data_version"]) == 32  # the DVC md5 digest of the prepared data
    assert version.description.startswith(f"digits, 5/class: test accuracy {metrics['self_train']['accuracy']:.4f}")
    assert "points above" in version.description or "points below" in version.description \
        or "level with" in version.description
    # Named after what it is, and shown on the parent run that produced it.
    assert logged.name == "rotation-convnet_small-digits-5-per-class-label_propagation"
    parent_id = _client().get_run(version.run_id).data.tags["mlflow.parentRunId"]
    assert model_id in [o.model_id for o in _client().get_run(parent_id).outputs.model_outputs]
    assert "Champion: promoted: first champion" in version.description


def test_prefect_result_links_to_the_mlflow_run(flow_run):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, summary = flow_run
    parent = _client().get_run(summary["mlflow_run_id"])
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[UUID(parent.data.tags["prefect.flow_run_id"])])))
    by_key = {a.key: a for a in artifacts}
    url = (f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
           "?workflowType=machine_learning")
    assert summary["mlflow_run_url"] == url  # a sqlite store: the address `make ui` serves it at
    assert summary["mlflow_experiment_url"] == (f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}"
                                                "?workflowType=machine_learning")
    result = by_key["pipeline-result"].data
    assert f"]({url})" in result and f"DVC experiment `{summary['dvc_experiment']}`" in result
    assert by_key["pipeline-mlflow-run"].data == f"[MLflow run {parent.info.run_name}]({url})"


def _task_run_states(flow_run_id: str) -> dict[str, str]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return {run.name: run.state.name for run in runs}


def test_a_rerun_with_nothing_changed_shows_its_stages_skipped_and_still_says_which_data_and_model(flow_run):
    """DVC skips every stage: Prefect shows them "Skipped", not "Completed" like stages that ran; the new parent run
    still shows the data and the final model it stands for."""
    from flows.pipeline import ssl_pipeline

    project, first = flow_run
    first_parent = _client().get_run(first["mlflow_run_id"])
    assert _task_run_states(first_parent.data.tags["prefect.flow_run_id"]) == {s: "Completed" for s in STAGES}
    again = ssl_pipeline(root=str(project), save_experiment=False)
    assert not any(s["executed"] for s in again["stages"])
    parent = _client().get_run(again["mlflow_run_id"])
    assert _task_run_states(parent.data.tags["prefect.flow_run_id"]) == {s: "Skipped" for s in STAGES}
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["digits v1"]
    final = json.loads((project / "artifacts/self_train/final.json").read_text())["registered_model"]
    assert [o.model_id for o in parent.outputs.model_outputs] == [final["model_id"]]
    assert parent.data.metrics["test_accuracy_ssl"] == first_parent.data.metrics["test_accuracy_ssl"]


def test_champion_rule_in_both_directions(flow_run):
    """The rule that every run's evaluate stage applies: better by more than the margin moves the alias, else not."""
    from mlflow import MlflowClient

    from tasks.registry import apply_champion_rule

    project, _ = flow_run
    client = MlflowClient()
    client.create_registered_model("rule-test")
    for _ in range(4):
        client.create_model_version("rule-test", source=str(project / "mlartifacts"))
    scores = {"1": 0.70}

    def measure(uri: str) -> float:  # the champion's accuracy on "this run's" test split
        return scores[uri.rsplit("/", 1)[1]]

    first = apply_champion_rule("rule-test", "1", 0.70, 0.005, measure)
    assert first.promoted and first.text.startswith("promoted: first champion")
    better = apply_champion_rule("rule-test", "2", 0.72, 0.005, measure)
    assert better.promoted and better.champion == "1" and better.champion_accuracy == 0.70
    assert str(client.get_model_version_by_alias("rule-test", "champion").version) == "2"
    scores["2"] = 0.72
    worse = apply_champion_rule("rule-test", "3", 0.69, 0.005, measure)
    assert not worse.promoted and worse.text.startswith("kept champion")
    tags = client.get_model_version("rule-test", "3").tags
    assert tags["champion_decision"] == worse.text and float(tags["champion_test_accuracy"]) == 0.72
    within_margin = apply_champion_rule("rule-test", "4", 0.724, 0.005, measure)
    assert not within_margin.promoted
    assert str(client.get_model_version_by_alias("rule-test", "champion").version) == "2"
    # Re-evaluating the champion itself keeps the decision that made it one.
    again = apply_champion_rule("rule-test", "2", 0.72, 0.005, measure)
    assert again.text.startswith("unchanged")
    assert client.get_model_version("rule-test", "2").tags["champion_decision"] == better.text


def test_an_experiment_of_ours_opens_in_the_model_training_view(flow_run):
    from mlflow import MlflowClient

    from tasks.tracking import experiment_id

    client = MlflowClient()
    old = client.create_experiment("made-by-an-older-version")  # no kind tag, as before this change
    chosen = client.create_experiment("kind-chosen-in-the-ui", tags={"mlflow.experimentKind": "genai_development"})
    assert experiment_id("made-by-an-older-version") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    experiment_id("kind-chosen-in-the-ui")
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_registered_model_loads_by_champion_alias(flow_run):
    import mlflow.pytorch
    import torch

    project, _ = flow_run
    model = mlflow.pytorch.load_model("models:/test-classifier-digits@champion")
    images = np.load(project / "data/prepared/images.npy")[:5]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, 10)
    version = _client().get_model_version_by_alias("test-classifier-digits", "champion")
    assert float(version.tags["test_accuracy"]) > 0


def test_flow_run_is_a_dvc_experiment(flow_run):
    project, summary = flow_run
    assert summary["dvc_experiment"]
    shown = run_cmd([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout
    assert summary["dvc_experiment"] in shown
    assert "ssl" in shown  # metrics.json made it into the experiment


def test_dvc_metrics_and_plots_read_the_outputs(flow_run):
    project, _ = flow_run
    metrics = json.loads(run_cmd([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project).stdout)
    assert "results/metrics.json" in json.dumps(metrics)
    plots = json.loads(run_cmd([sys.executable, "-m", "dvc", "plots", "show", "--json"], project).stdout)["data"]
    assert {"finetune_val_accuracy", "confusion_ssl", "confusion_baseline"} <= set(plots)
    assert any("history.csv" in key for key in plots)


def test_repro_right_after_a_run_executes_nothing(flow_run):
    project, _ = flow_run
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout
    # Only the fingerprint stage runs, as on every repro: it finds the source unchanged.
    assert _stages_run_by(out) == set(), out
    assert "Running stage 'fingerprint'" in out and "Stage 'ingest' didn't change" in out


def _stale(project: Path) -> set[str]:
    """The stages `dvc status` finds changed, less the fingerprint stage that dvc.yaml marks always changed."""
    return set(json.loads(run_cmd([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)) - {"fingerprint"}


def _stale_after_editing(project: Path, rel: str) -> set[str]:
    """The stages `dvc status` finds changed once ``rel`` (a code file of the project) gets one more line."""
    path = project / rel
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        return _stale(project)
    finally:
        path.write_text(original)


def test_code_edits_make_exactly_the_stages_that_run_that_code_stale(flow_run):
    project, _ = flow_run
    assert _stale_after_editing(project, "ssl_lib/evaluation.py") == {"evaluate"}
    assert _stale_after_editing(project, "ssl_lib/self_train.py") == {"self_train"}
    assert _stale_after_editing(project, "ssl_lib/classifier.py") == {"finetune", "self_train", "evaluate"}
    # pseudo_labels and pretrain run the method; the stages after them rerun when the encoder changes.
    assert _stale_after_editing(project, "ssl_lib/methods/rotation.py") == {"pseudo_labels", "pretrain"}
    assert _stale_after_editing(project, "ssl_lib/data/splits.py") == {"ingest"}
    assert _stale(project) == set()
    path = project / "ssl_lib/evaluation.py"
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        out = run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout
        assert _stages_run_by(out) == {"evaluate"}, out
    finally:
        path.write_text(original)
    run_cmd([sys.executable, "-m", "dvc", "commit", "--force", "evaluate"], project)


def _bump_param(project: Path, section: str, key: str, delta: int) -> None:
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params[section][key] += delta
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def _stages_run_by(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def test_changing_a_finetune_param_reruns_finetune_and_evaluate_only(flow_run):
    project, _ = flow_run
    _bump_param(project, "finetune", "epochs", 1)
    status = run_cmd([sys.executable, "-m", "dvc", "status"], project).stdout
    assert "finetune" in status and "pretrain" not in status and "ingest" not in status

    client = _client()
    before = {r.info.run_id for r in client.search_runs([_experiment_id(client)])}
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout
    assert _stages_run_by(out) == {"finetune", "self_train", "evaluate"}, out

    # A plain `dvc repro` also gets one parent run with a nested run per executed stage.
    new_runs = [r for r in client.search_runs([_experiment_id(client)]) if r.info.run_id not in before]
    parents = [r for r in new_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["sslpipe.parent_owner"] == "dvc"
    children = [r for r in new_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["sslpipe.stage"] for r in children) == ["evaluate", "finetune", "self_train"]
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    # The dvc-owned parent is named and described too: the change from the committed params shows.
    parent = client.get_run(parents[0].info.run_id)
    assert parent.info.run_name.startswith("rotation 5/class") and "finetune.epochs=5" in parent.info.run_name
    assert "DVC ran finetune, self_train, evaluate" in parent.data.tags["mlflow.note.content"]
    # A second registered version exists, with its metrics, and the champion rule decided for it as in any run.
    versions = client.search_model_versions("name = 'test-classifier-digits'")
    assert len(versions) == 2 and all("test_accuracy" in v.tags for v in versions)
    v1, v2 = (client.get_model_version("test-classifier-digits", v) for v in ("1", "2"))
    better = float(v2.tags["test_accuracy"]) > float(v2.tags["champion_test_accuracy"]) + 0.005
    assert v2.tags["champion_decision"].startswith("promoted" if better else "kept champion")
    assert v2.tags["champion_test_accuracy"] == v1.tags["test_accuracy"]  # both rounded to 4 decimals
    champion = client.get_model_version_by_alias("test-classifier-digits", "champion")
    assert str(champion.version) == ("2" if better else "1")


def test_pseudo_labels_cover_the_pool_and_never_val_or_test(flow_run):
    import pandas as pd

    project, _ = flow_run
    manifest = pd.read_csv(project / "data/prepared/manifest.csv")
    table = pd.read_csv(project / "artifacts/self_train/pseudo_labels.csv")
    pool = set(manifest.loc[manifest["split"].isin(["unlabeled", "labeled"]), "index"])
    assert set(table["index"]) == pool
    held_out = set(manifest.loc[manifest["split"].isin(["val", "test"]), "index"])
    assert not set(table["index"]) & held_out
    assert table["confidence"].between(0, 1).all() and table["used"].any()
    assert set(table.columns) >= {"index", "source_id", "label", "class", "confidence", "weight", "used"}


def test_changing_a_self_train_param_reruns_self_train_and_evaluate_only(flow_run):
    project, _ = flow_run
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["self_train"]["knn_k"] += 1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout
    assert _stages_run_by(out) == {"self_train", "evaluate"}, out
    assert _stages_run_by(run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout) == set()
    # The stage's run logs the pseudo-labels' accuracy on val per round.
    client = _client()
    run = client.search_runs([_experiment_id(client)], filter_string="tags.`sslpipe.stage` = 'self_train'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    history = client.get_metric_history(run.info.run_id, "label_propagation_pseudo_label_val_accuracy")
    assert [m.step for m in history] == [1, 2]


def test_method_none_makes_the_fine_tuned_model_final(flow_run):
    import torch

    project, _ = flow_run
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["self_train"]["method"] = "none"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout
    assert _stages_run_by(out) == {"self_train", "evaluate"}, out
    final = torch.load(project / "artifacts/self_train/classifier.pt", weights_only=True)
    ssl = torch.load(project / "artifacts/finetune/ssl_classifier.pt", weights_only=True)
    assert all(torch.equal(final[k], ssl[k]) for k in ssl)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert "self_train" not in metrics and {"ssl", "baseline"} <= set(metrics)


def test_rerunning_pretrain_reproduces_the_encoder_bit_for_bit(flow_run):
    """Same params and seed on CPU give the same weights: DVC then finds nothing downstream stale."""
    project, _ = flow_run
    before = (project / "artifacts/pretrain/encoder.pt").read_bytes()
    run_cmd([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "pretrain"], project)
    assert (project / "artifacts/pretrain/encoder.pt").read_bytes() == before
    status = run_cmd([sys.executable, "-m", "dvc", "status"], project).stdout
    assert "finetune" not in status and "evaluate" not in status, status


def test_predict_from_champion_on_a_folder_with_a_corrupt_image(flow_run, tmp_path):
    import pandas as pd
    from PIL import Image
    from typer.testing import CliRunner

    from flows.cli import app

    project, _ = flow_run
    images = np.load(project / "data/prepared/images.npy")[:3, :, :, 0]
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i}.png")
    (folder / "zz_broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pred.csv"
    # No --model: the champion of the data params.yaml names (test-classifier-digits: one registered model per source).
    result = CliRunner().invoke(app, ["predict", str(folder), "-o", str(out), "--root", str(project)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table["status"]) == ["ok", "ok", "ok", "error"]
    assert table.loc[3, "id"] == "zz_broken.jpg" and isinstance(table.loc[3, "error"], str)
    probs = table.filter(like="prob_").iloc[:3].to_numpy()
    assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-4)


def test_predict_a_prepared_split_matches_the_evaluated_accuracy(flow_run, tmp_path):
    import pandas as pd

    from tasks.predict import predict

    project, _ = flow_run
    version = _client().get_model_version_by_alias("test-classifier-digits", "champion")
    table = predict("split:test", f"models:/test-classifier-digits/{version.version}", tmp_path / "p.csv",
                    prepared_dir=project / "data/prepared")
    manifest = pd.read_csv(project / "data/prepared/manifest.csv")
    test = manifest[manifest["split"] == "test"]
    assert list(table["id"]) == list(test["source_id"])
    names = [str(i) for i in range(10)]
    predicted = table["predicted_class"].astype(str).map(names.index).to_numpy()
    accuracy = float((predicted == test["label"].to_numpy()).mean())
    versions = {v.version: v.tags for v in _client().search_model_versions("name = 'test-classifier-digits'")}
    assert version.tags["test_accuracy"] == f"{accuracy:.4f}", (version.version, versions)  # rounded: read by people


def test_a_new_label_budget_reuses_the_pretrained_encoder(flow_run):
    """Pretraining never sees labels: changing the budget reruns ingest, finetune and evaluate only."""
    project, _ = flow_run
    _bump_param(project, "data", "labels_per_class", 2)
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout
    assert _stages_run_by(out) == {"ingest", "finetune", "self_train", "evaluate"}, out
