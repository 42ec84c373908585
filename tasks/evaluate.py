"""Stage 6, evaluate: every classifier (supervised baseline, SSL fine-tune, SSL + self-training) on the test
split: accuracy, kNN on frozen features, per-class table, confusion matrices, metrics.json for `dvc metrics`
and plot data for `dvc plots`."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd

from ssl_lib.config import PipelineParams
from tasks import paths
from tasks.common import run_stage_cli

log = logging.getLogger("sslpipe.evaluate")
CONFUSION_PNGS = {"ssl": paths.CONFUSION_SSL, "baseline": paths.CONFUSION_BASELINE,
                  "self_train": paths.CONFUSION_FINAL}


def _load_classifiers(spec: dict, self_trained: bool) -> dict:
    """The rows evaluated: the baseline, the fine-tuned SSL classifier and, when self_train ran, its student."""
    import torch

    from ssl_lib.classifier import build_classifier
    from ssl_lib.errors import DataError

    models = {}
    sources = [("ssl", paths.SSL_CLASSIFIER, "finetune"), ("baseline", paths.BASELINE_CLASSIFIER, "finetune")]
    if self_trained:
        sources.append(("self_train", paths.FINAL_CLASSIFIER, "self_train"))
    for kind, path, stage in sources:
        if not path.is_file():
            raise DataError(f"{path} is missing; run the stage first: dvc repro {stage}")
        model = build_classifier(**spec)
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        models[kind] = model.eval()
    return models


def run(params: PipelineParams) -> dict:
    import mlflow
    import torch
    from mlflow import MlflowClient

    from ssl_lib.classifier import build_classifier
    from ssl_lib.data.prepared import load_prepared
    from ssl_lib.errors import DataError
    from ssl_lib.evaluation import extract_features, knn_accuracy, per_class_table, predict_proba, save_confusion_png
    from ssl_lib.io import atomic_path, write_json
    from tasks.finetune import load_encoder_info
    from tasks.registry import crown_if_no_champion, record_metrics
    from tasks.tracking import stage_run

    with stage_run("evaluate", params, section={"evaluate": params.evaluate.model_dump()}) as run_id:
        data = load_prepared(paths.PREPARED)
        test_x, test_y = data.split("test")
        known_x, known_y = (np.concatenate(pair) for pair in zip(data.split("labeled"), data.split("val"), strict=True))
        if not paths.FINAL_INFO.is_file():
            raise DataError(f"{paths.FINAL_INFO} is missing; run the stage first: dvc repro self_train")
        final_info = json.loads(paths.FINAL_INFO.read_text())
        class_names = final_info["class_names"]
        spec = {k: final_info[k] for k in ("backbone", "in_channels", "image_size", "num_classes", "mean", "std")}
        models = _load_classifiers(spec, self_trained=final_info["method"] != ["none"])
        k = min(params.evaluate.knn_k, len(known_y))

        def knn(model) -> float:
            return knn_accuracy(extract_features(model, known_x), known_y, extract_features(model, test_x), test_y, k=k)

        metrics: dict = {}
        predictions = pd.DataFrame({"actual": [class_names[i] for i in test_y]})
        tables = []
        for kind, model in models.items():
            predicted = predict_proba(model, test_x).argmax(axis=1)
            table = per_class_table(test_y, predicted, class_names)
            tables.append(table.assign(model=kind))
            metrics[kind] = {"accuracy": float((predicted == test_y).mean()), "knn_accuracy": knn(model),
                             "macro_f1": float(table["f1"].iloc[:len(class_names)].mean())}
            predictions[kind] = [class_names[i] for i in predicted]
            title = {"baseline": "supervised-only baseline", "ssl": f"SSL fine-tune ({params.pretrain.method})",
                     "self_train": f"SSL + {'+'.join(final_info['method'])} (final model)"}[kind]
            save_confusion_png(test_y, predicted, class_names, CONFUSION_PNGS[kind], model_name=title)

        # Frozen features before any label was seen: what pretraining alone bought over random weights.
        _, encoder_state = load_encoder_info()
        torch.manual_seed(params.seed)
        metrics["pretrained_encoder_knn_accuracy"] = knn(build_classifier(**spec, encoder_state=encoder_state).eval())
        torch.manual_seed(params.seed)
        metrics["random_encoder_knn_accuracy"] = knn(build_classifier(**spec).eval())
        metrics["ssl_gain"] = metrics["ssl"]["accuracy"] - metrics["baseline"]["accuracy"]
        if "self_train" in metrics:
            metrics["self_train_gain"] = metrics["self_train"]["accuracy"] - metrics["baseline"]["accuracy"]
        metrics["num_test"] = int(len(test_y))

        write_json(paths.METRICS, metrics)
        with atomic_path(paths.PER_CLASS) as tmp:
            pd.concat(tables, ignore_index=True).to_csv(tmp, index=False)
        with atomic_path(paths.PREDICTIONS) as tmp:
            predictions.to_csv(tmp, index=False)

        flat = headline_metrics(metrics)
        mlflow.log_metrics(flat)
        client = MlflowClient()
        parent_id = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if parent_id:
            for key, value in flat.items():
                client.log_metric(parent_id, key, value)
        final = "self_train" if "self_train" in metrics else "ssl"
        if final == "ssl":
            shutil.copyfile(paths.CONFUSION_SSL, paths.CONFUSION_FINAL)
        for artifact in (paths.CONFUSION_BASELINE, paths.CONFUSION_SSL, paths.CONFUSION_FINAL, paths.PER_CLASS,
                         paths.METRICS):
            mlflow.log_artifact(str(artifact))

        registered = final_info.get("registered_model") or {}
        if registered.get("version") and not _in_registry(registered):
            # The final model was registered in another tracking store (outputs pulled with `dvc pull`, or a copied
            # workspace): the metrics stay in metrics.json and on this run.
            log.warning("model %s version %s is not in this tracking store (%s); run `dvc repro --force self_train` "
                        "to register the final model here", registered["name"], registered["version"],
                        mlflow.get_tracking_uri())
        elif registered.get("version"):
            record_metrics(registered["name"], registered["version"],
                           {"test_accuracy": metrics[final]["accuracy"],
                            "baseline_test_accuracy": flat["test_accuracy_baseline"]})
            crown_if_no_champion(registered["name"], registered["version"])
        log.info("test accuracy: supervised baseline %.4f, SSL fine-tune %.4f%s", flat["test_accuracy_baseline"],
                 flat["test_accuracy_ssl"], f", SSL + {'+'.join(final_info['method'])} "
                 f"{metrics['self_train']['accuracy']:.4f}" if final == "self_train" else "")
    return metrics


def _in_registry(registered: dict) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_model_version(registered["name"], registered["version"])
    except MlflowException:
        return False
    return True


def headline_metrics(metrics: dict) -> dict[str, float]:
    """results/metrics.json flattened into the metric names runs are compared by in MLflow."""
    return {"test_accuracy_ssl": metrics["ssl"]["accuracy"],
            "test_accuracy_baseline": metrics["baseline"]["accuracy"],
            "knn_accuracy_ssl": metrics["ssl"]["knn_accuracy"],
            "knn_accuracy_baseline": metrics["baseline"]["knn_accuracy"],
            "macro_f1_ssl": metrics["ssl"]["macro_f1"], "macro_f1_baseline": metrics["baseline"]["macro_f1"],
            "knn_accuracy_pretrained_encoder": metrics["pretrained_encoder_knn_accuracy"],
            "knn_accuracy_random_encoder": metrics["random_encoder_knn_accuracy"],
            "ssl_gain": metrics["ssl_gain"],
            **({"test_accuracy_self_train": metrics["self_train"]["accuracy"],
                "knn_accuracy_self_train": metrics["self_train"]["knn_accuracy"],
                "macro_f1_self_train": metrics["self_train"]["macro_f1"],
                "self_train_gain": metrics["self_train_gain"]} if "self_train" in metrics else {})}



if __name__ == "__main__":
    run_stage_cli("evaluate", run)
