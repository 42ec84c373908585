"""Stage 6, evaluate: every classifier (supervised baseline, SSL fine-tune, SSL + self-training) on the test
split: accuracy, kNN on frozen features, per-class table, confusion matrices, metrics.json for `dvc metrics`
and plot data for `dvc plots`."""
from __future__ import annotations

import json
import logging
import shutil
from typing import TYPE_CHECKING

import numpy as np

from tasks import paths
from tasks.common import run_stage_cli

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams
    from ssl_lib.evaluation import Evaluation

log = logging.getLogger("sslpipe.evaluate")
CONFUSION_PNGS = {"ssl": paths.CONFUSION_SSL, "baseline": paths.CONFUSION_BASELINE,
                  "self_train": paths.CONFUSION_FINAL}


def _load_classifiers(spec: dict, self_trained: bool) -> dict:
    """The rows evaluated: the baseline, the fine-tuned SSL classifier and, when self_train ran, its student."""
    from ssl_lib.classifier import load_classifier
    from ssl_lib.errors import DataError

    models = {}
    sources = [("ssl", paths.SSL_CLASSIFIER, "finetune"), ("baseline", paths.BASELINE_CLASSIFIER, "finetune")]
    if self_trained:
        sources.append(("self_train", paths.FINAL_CLASSIFIER, "self_train"))
    for kind, path, stage in sources:
        if not path.is_file():
            raise DataError(f"{path} is missing; run the stage first: dvc repro {stage}")
        models[kind] = load_classifier(spec, path).eval()
    return models


def run(params: PipelineParams) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from ssl_lib.classifier import classifier_spec
    from ssl_lib.data.prepared import load_prepared
    from ssl_lib.errors import DataError
    from ssl_lib.evaluation import evaluate_classifiers
    from ssl_lib.sizing import knn_probe_k
    from tasks.pretrained import load_encoder_info
    from tasks.run_summary import headline_metrics
    from tasks.tracking import log_results, stage_run

    with stage_run("evaluate", params, section={"evaluate": params.evaluate.model_dump()}) as run_id:
        # Load: the test split, the images the kNN probe knows, every classifier and the pretrained encoder.
        data = load_prepared(paths.PREPARED)
        test_x, test_y = data.split("test")
        known_x, known_y = (np.concatenate(pair) for pair in zip(data.split("labeled"), data.split("val"), strict=True))
        if not paths.FINAL_INFO.is_file():
            raise DataError(f"{paths.FINAL_INFO} is missing; run the stage first: dvc repro self_train")
        final_info = json.loads(paths.FINAL_INFO.read_text())
        class_names = final_info["class_names"]
        spec = classifier_spec(final_info)
        models = _load_classifiers(spec, self_trained=final_info["method"] != ["none"])
        _, encoder_state = load_encoder_info()

        # The recipe: every number of results/.
        result = evaluate_classifiers(models, test_x, test_y, known_x, known_y, class_names, spec, encoder_state,
                                      knn_k=knn_probe_k(params.evaluate.knn_k, len(known_y), len(class_names)),
                                      seed=params.seed)
        metrics, final = result.metrics, result.final

        # Write.
        labels = _model_labels(params, final_info["method"], final_info.get("final_model"))
        _write_results(result, test_y, class_names, labels)

        # Log.
        flat = headline_metrics(metrics)
        mlflow.log_metrics(flat)
        for artifact in (*paths.RESULT_FILES, paths.CONFUSION_BASELINE, paths.CONFUSION_SSL):
            mlflow.log_artifact(str(artifact))
        parent_id = MlflowClient().get_run(run_id).data.tags.get("mlflow.parentRunId")
        if parent_id:
            log_results(parent_id, flat, list(paths.RESULT_FILES))

        registered = final_info.get("registered_model") or {}
        if registered.get("version") and not _in_registry(registered):
            # The final model was registered in another tracking store (outputs pulled with `dvc pull`, or a copied
            # workspace): the metrics stay in metrics.json and on this run.
            log.warning("model %s version %s is not in this tracking store (%s); run `dvc repro --force self_train` "
                        "to register the final model here", registered["name"], registered["version"],
                        mlflow.get_tracking_uri())
        elif registered.get("version"):
            _record_on_registry(params, registered["name"], str(registered["version"]), metrics, final,
                                labels[final], parent_id)
        log.info("test accuracy: supervised baseline %.4f, SSL fine-tune %.4f%s", flat["test_accuracy_baseline"],
                 flat["test_accuracy_ssl"], f", SSL + {'+'.join(final_info['method'])} "
                 f"{metrics['self_train']['accuracy']:.4f}" if final == "self_train" else "")
    return metrics


def _write_results(result: Evaluation, test_labels: np.ndarray, class_names: list[str],
                   labels: dict[str, str]) -> None:
    """results/: each model's confusion matrix (the final model's also as confusion_final.png), metrics.json, the
    per-class table and chart (baseline, ssl, self_train in that order) and the predictions. ``labels`` name the
    models in the figures."""
    from ssl_lib.evaluation import save_confusion_png, save_per_class_png, wide_per_class_table
    from ssl_lib.io import atomic_path, write_json

    for kind, predicted in result.predicted.items():
        save_confusion_png(test_labels, predicted, class_names, CONFUSION_PNGS[kind],
                           model_name=labels[kind] + (" (final model)" if kind == result.final else ""))
    if result.final == "ssl":
        shutil.copyfile(paths.CONFUSION_SSL, paths.CONFUSION_FINAL)
    write_json(paths.METRICS, result.metrics)
    ordered = {kind: result.tables[kind] for kind in ("baseline", "ssl", "self_train") if kind in result.tables}
    with atomic_path(paths.PER_CLASS) as tmp:  # read by people: 4 decimals (1/1038 needs no more)
        wide_per_class_table(ordered).round(4).to_csv(tmp, index=False)
    save_per_class_png(ordered, paths.PER_CLASS_PNG, labels={kind: labels[kind] for kind in ordered},
                       accuracies={kind: result.metrics[kind]["accuracy"] for kind in ordered})
    with atomic_path(paths.PREDICTIONS) as tmp:
        result.predictions.to_csv(tmp, index=False)


def _model_labels(params: PipelineParams, self_train_method: list[str], final_model: str | None) -> dict[str, str]:
    """How the figures and the registry name each evaluated model (the self_train row is the final model, which
    the self_train stage chose on val: a round's model, or the fine-tune it started from)."""
    final = f"SSL + {'+'.join(self_train_method)}"
    if final_model == "fine-tune" and self_train_method != ["none"]:
        final = f"SSL fine-tune, kept over {'+'.join(self_train_method)} on val"
    elif final_model and final_model.startswith("round") and params.self_train.rounds > 1:
        final += f", {final_model}"
    return {"baseline": "supervised-only baseline", "ssl": f"SSL fine-tune ({params.pretrain.method})",
            "self_train": final}


def _record_on_registry(params: PipelineParams, name: str, version: str, metrics: dict, final: str, label: str,
                        parent_id: str | None) -> None:
    """The final model's scores on its logged model (the model pages compare them) and on its registered
    version, then the champion rule; the decision also goes on the parent run."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.registry import (
        STATUS_TAG,
        apply_champion_rule,
        describe_version,
        logged_model_id,
        record_metrics,
        tag_version,
    )
    from tasks.run_summary import against_baseline, data_label, label_budget
    from tasks.tracking import MODEL_TAG, attach_model

    client = MlflowClient()
    scores = metrics[final]
    model_id = logged_model_id(name, version)
    if model_id:
        mlflow.log_metrics({"test_accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                            "knn_accuracy": scores["knn_accuracy"],
                            "baseline_test_accuracy": metrics["baseline"]["accuracy"]}, model_id=model_id)
    record_metrics(name, version, {"baseline_test_accuracy": metrics["baseline"]["accuracy"]})
    # The alias moves only once the scores are recorded: a failure before leaves the champion as it was.
    decision = apply_champion_rule(name, version, scores["accuracy"], params.evaluate.champion_margin)
    gain = scores["accuracy"] - metrics["baseline"]["accuracy"]
    # It leads with what tells versions apart in a list: the data, the label budget and the result.
    describe_version(name, version, (
        f"{data_label(params)}, {label_budget(params)}: test accuracy {scores['accuracy']:.4f} (macro F1 "
        f"{scores['macro_f1']:.4f}, kNN {scores['knn_accuracy']:.4f}), {against_baseline(gain)} "
        f"({metrics['baseline']['accuracy']:.4f}). {label}: {params.pretrain.method} pretraining of "
        f"{params.pretrain.backbone}, {params.finetune.mode} fine-tune. Champion: {decision.text}."))
    if parent_id:
        client.set_tag(parent_id, MODEL_TAG, f"`{name}` v{version}, {decision.text}")
        if model_id:  # the run a user opens shows the model it produced among its logged models
            attach_model(parent_id, model_id)
        if decision.champion_accuracy is not None:
            client.log_metric(parent_id, "champion_test_accuracy", decision.champion_accuracy)
    tag_version(name, version, {STATUS_TAG: "evaluated"})  # last: until here a retry redoes every step above


def _in_registry(registered: dict) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_model_version(registered["name"], registered["version"])
    except MlflowException:
        return False
    return True


if __name__ == "__main__":
    run_stage_cli("evaluate", run)
