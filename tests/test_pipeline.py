"""End to end: a real Prefect flow run over real DVC stages, tracked in a real MLflow store, on digits."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import make_project, run_cmd, use_project

pytestmark = pytest.mark.slow

STAGES = ("ingest", "pseudo_labels", "pretrain", "finetune", "self_train", "evaluate")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, prefect_server):
    project = make_project(tmp_path_factory.mktemp("pipeline") / "proj")
    use_project(project)
    from flows.pipeline import ssl_pipeline

    summary = ssl_pipeline(overrides={"pretrain.method": "rotation"}, root=str(project))
    return project, summary


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
    pretrain = next(r for r in children if r.data.tags["sslpipe.stage"] == "pretrain")
    history = client.get_metric_history(pretrain.info.run_id, "pretrain_loss")
    assert len(history) == 2  # one point per epoch
    evaluate = next(r for r in children if r.data.tags["sslpipe.stage"] == "evaluate")
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"confusion_ssl.png", "per_class.csv"} <= artifacts


def test_registered_model_loads_by_champion_alias(flow_run):
    import mlflow.pytorch
    import torch

    project, _ = flow_run
    model = mlflow.pytorch.load_model("models:/test-classifier@champion")
    images = np.load(project / "data/prepared/images.npy")[:5]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, 10)
    version = _client().get_model_version_by_alias("test-classifier", "champion")
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
    # A second registered version exists, with its metrics; only retraining moves the champion alias.
    versions = client.search_model_versions("name = 'test-classifier'")
    assert len(versions) == 2 and all("test_accuracy" in v.tags for v in versions)
    assert str(client.get_model_version_by_alias("test-classifier", "champion").version) == "1"


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
    result = CliRunner().invoke(app, ["predict", str(folder), "--model", "models:/test-classifier@champion",
                                      "-o", str(out), "--root", str(project)])
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
    version = _client().get_model_version_by_alias("test-classifier", "champion")
    table = predict("split:test", f"models:/test-classifier/{version.version}", tmp_path / "p.csv",
                    prepared_dir=project / "data/prepared")
    manifest = pd.read_csv(project / "data/prepared/manifest.csv")
    test = manifest[manifest["split"] == "test"]
    assert list(table["id"]) == list(test["source_id"])
    names = [str(i) for i in range(10)]
    predicted = table["predicted_class"].astype(str).map(names.index).to_numpy()
    accuracy = float((predicted == test["label"].to_numpy()).mean())
    assert accuracy == pytest.approx(float(version.tags["test_accuracy"]), abs=1e-6)


def test_a_new_label_budget_reuses_the_pretrained_encoder(flow_run):
    """Pretraining never sees labels: changing the budget reruns ingest, finetune and evaluate only."""
    project, _ = flow_run
    _bump_param(project, "data", "labels_per_class", 2)
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], project).stdout
    assert _stages_run_by(out) == {"ingest", "finetune", "self_train", "evaluate"}, out
