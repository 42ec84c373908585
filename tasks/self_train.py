"""Stage 5, self_train: the unlabeled pool teaches the fine-tuned classifier (label propagation, distillation,
FixMatch), and the final model is registered in MLflow. With ``self_train.method: none`` the fine-tuned SSL
classifier is the final model, unchanged."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from tasks import paths
from tasks.common import run_stage_cli

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams

log = logging.getLogger("sslpipe.self_train")


def run(params: PipelineParams) -> dict:
    import json

    import mlflow
    import pandas as pd

    from ssl_lib.classifier import classifier_spec, load_classifier
    from ssl_lib.data.prepared import load_prepared
    from ssl_lib.errors import DataError
    from ssl_lib.io import atomic_path, save_torch, write_json
    from ssl_lib.self_train import SELECTION_RULE, SelfTrainSettings, self_train
    from ssl_lib.self_train_pool import SelfTrainPool, pseudo_label_table, save_pseudo_label_preview
    from tasks.registry import STATUS_TAG, check_same_task, log_classifier, provenance, registered_model, tag_version
    from tasks.tracking import stage_run

    section = {"seed": params.seed, "self_train": params.self_train.model_dump()}
    with stage_run("self_train", params, section=section) as run_id:
        data = load_prepared(paths.PREPARED)
        height, width, channels = (int(d) for d in data.images.shape[1:])
        # Before training: this stage registers the model, which must be comparable with the champion it joins.
        check_same_task(registered_model(params), len(data.class_names), (channels, height, width),
                        list(data.class_names))
        if not paths.SSL_CLASSIFIER.is_file() or not paths.CLASSIFIER_INFO.is_file():
            raise DataError(f"{paths.SSL_CLASSIFIER} is missing; run the stage first: dvc repro finetune")
        info = json.loads(paths.CLASSIFIER_INFO.read_text())
        spec = classifier_spec(info)
        model = load_classifier(spec, paths.SSL_CLASSIFIER)
        pool = SelfTrainPool.of(data)
        settings = SelfTrainSettings.from_params(params, pool.size, spec["num_classes"], spec["image_size"])
        mlflow.log_params({"resolved.epochs": round(settings.epochs, 4), "resolved.batch_size": settings.batch_size,
                           "resolved.knn_k": settings.knn_k})
        history: list[dict] = []
        pseudo = None
        if settings.steps and settings.rounds > 0:
            images = pool.images()
            val_x, val_y = data.split("val")

            def on_epoch(row: dict) -> None:
                step = len(history)
                mlflow.log_metrics({f"{row['method']}_{k}": float(v) for k, v in row.items()
                                    if k not in ("method", "round", "epoch")}, step=step)

            def on_round(row: dict) -> None:
                mlflow.log_metrics({f"{row['method']}_{k}": float(v) for k, v in row.items()
                                    if k not in ("method", "round")}, step=int(row["round"]))

            log.info("self-training on a pool of %d images (%d labeled), steps %s x %d rounds", pool.size,
                     len(pool.labeled), "+".join(settings.steps), settings.rounds)
            result = self_train(model, images, pool.labeled, pool.labels, val_x, val_y, settings,
                                on_epoch=lambda r: (history.append(r), on_epoch(r)), on_round=on_round,
                                teacher_val_optimism=info["val_optimism"]["ssl"])
            model = result.model.cpu().eval()
            candidates = [{"name": c.name, "val_accuracy": round(c.val_accuracy, 4),
                           "val_optimism": round(c.val_optimism, 4), "chosen": i == result.chosen}
                          for i, c in enumerate(result.candidates)]
            chosen = result.candidates[result.chosen].name
            mlflow.log_metrics({"final_candidate": result.chosen,
                                **{f"candidate_val_accuracy_{c.name.replace(' ', '_')}": c.val_accuracy
                                   for c in result.candidates}})
            tag_final_choice(run_id, final_choice_text(result.candidates, result.chosen, len(val_y),
                                                       settings.selection_margin))
            pseudo = result.pseudo_labels
            save_pseudo_label_preview(images, pseudo.label, pseudo.confidence, data.class_names,
                                      paths.POOL_PSEUDO_PREVIEW)
            mlflow.log_artifact(str(paths.POOL_PSEUDO_PREVIEW))
        else:
            log.info("self_train.method is none: the fine-tuned SSL classifier is the final model")
            candidates, chosen = [], "fine-tune"
            save_pseudo_label_preview(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), np.zeros(0),
                                      data.class_names, paths.POOL_PSEUDO_PREVIEW)
        with atomic_path(paths.POOL_PSEUDO_LABELS) as tmp:
            pseudo_label_table(pool, pseudo).to_csv(tmp, index=False)
        with atomic_path(paths.SELF_TRAIN_HISTORY) as tmp:
            pd.DataFrame(history, columns=None if history else ["round", "method", "epoch", "val_acc"]).to_csv(
                tmp, index=False)
        mlflow.log_artifact(str(paths.SELF_TRAIN_HISTORY))
        save_torch(model.state_dict(), paths.FINAL_CLASSIFIER)
        train_x, _ = data.split("labeled")
        trained_from = provenance(params)
        registered = log_classifier(model, train_x[:4], params.finetune.registered_model_name,
                                    class_names=data.class_names, model_params=trained_from)
        if registered["version"]:
            # pending until the evaluate stage records its scores (tasks.registry.STATUS_TAG)
            tag_version(registered["name"], registered["version"], {STATUS_TAG: "pending", **trained_from})
        # What this model has seen (digests of every non-test image's key): the record that lets anyone check
        # a comparison with another model was made on images neither has seen.
        import tempfile
        from pathlib import Path

        from ssl_lib.data.prepared import SEEN_KEYS_FILE

        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / SEEN_KEYS_FILE, data.seen_keys(), allow_pickle=False)
            mlflow.log_artifact(str(Path(tmp) / SEEN_KEYS_FILE))
        ran = list(settings.steps) if settings.steps and settings.rounds > 0 else ["none"]
        write_json(paths.FINAL_INFO, {**spec, "class_names": data.class_names, "method": ran,
                                      "rounds": settings.rounds, "registered_model": registered,
                                      "final_model": chosen, "candidates": candidates, "rule": SELECTION_RULE})
    return registered


def final_choice_text(candidates: list, chosen: int, val_images: int, margin: float) -> str:
    """``round 2, of fine-tune 0.7400 (0.7200 counted, optimism 0.0200), round 1 0.7200, round 2 0.7200 in
    accuracy on the 100 val images ...``"""
    from ssl_lib.self_train import candidate_scores

    return (f"{candidates[chosen].name}, of {candidate_scores(candidates)} in accuracy on the {val_images} labeled "
            f"val images (the last round unless an earlier candidate leads it by more than {margin:g}; the "
            f"fine-tune's epoch was chosen on these images, so it counts less that optimism; test is never used to "
            f"choose)")


def tag_final_choice(run_id: str, text: str) -> None:
    """The final model's choice, on this stage's run and on its parent (whose description shows it)."""
    from mlflow import MlflowClient

    from tasks.tracking import FINAL_CHOICE_TAG

    client = MlflowClient()
    client.set_tag(run_id, FINAL_CHOICE_TAG, text)
    parent_id = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if parent_id:
        client.set_tag(parent_id, FINAL_CHOICE_TAG, text)


if __name__ == "__main__":
    run_stage_cli("self_train", run)
