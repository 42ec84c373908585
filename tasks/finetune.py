"""Stage 4, finetune: the pretrained encoder plus a head on the small labeled set, and a supervised-only
baseline trained on exactly the same labels with the same budget. The self_train stage registers the final model."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks import paths
from tasks.common import run_stage_cli

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams

log = logging.getLogger("sslpipe.finetune")

# The params that set each model's learning rates (FinetuneSettings.from_params), named when its training diverges.
_LR_KEYS = {"ssl": "finetune.lr, and finetune.lp_lr for the linear probe",
            "baseline": "finetune.baseline_lr, or finetune.lr where it is null"}


def run(params: PipelineParams) -> dict:
    import mlflow
    import pandas as pd

    from ssl_lib.classifier import FinetuneSettings, val_optimism
    from ssl_lib.data.prepared import load_prepared
    from ssl_lib.errors import TrainingDiverged
    from ssl_lib.finetune import KINDS, ClassifierDiverged, finetune_pair
    from ssl_lib.io import atomic_path, save_torch, write_json
    from tasks.pretrained import load_encoder_info
    from tasks.tracking import stage_run

    section = {"seed": params.seed, "finetune": params.finetune.model_dump(),
               "pretrain.backbone": params.pretrain.backbone}
    with stage_run("finetune", params, section=section):
        data = load_prepared(paths.PREPARED)
        train_x, train_y = data.split("labeled")
        val_x, val_y = data.split("val")
        info, encoder_state = load_encoder_info()
        num_classes = len(data.meta["class_names"])
        spec = dict(backbone=info["backbone"], in_channels=info["in_channels"], image_size=info["image_size"],
                    num_classes=num_classes, mean=info["mean"], std=info["std"])
        settings = {kind: FinetuneSettings.from_params(params, info["image_size"], baseline=kind == "baseline")
                    for kind in KINDS}
        try:
            pair = finetune_pair(spec, encoder_state, train_x, train_y, val_x, val_y, settings, seed=params.seed,
                                 on_epoch=_epoch_logger(""), on_lp_epoch=_epoch_logger("lp_"))
        except ClassifierDiverged as err:  # the message names the model, the phase and step; this, its params
            raise TrainingDiverged(f"{err} (set by {_LR_KEYS[err.kind]})") from None
        models = {}
        # How far each kept epoch's val accuracy overstates its model: self_train's rule discounts the SSL one's.
        optimism = {kind: val_optimism(pair.histories[kind]) for kind in KINDS}
        for kind in KINDS:
            models[kind] = pair.models[kind].cpu().eval()
            history = pair.histories[kind]
            with atomic_path(paths.FINETUNE_HISTORY[kind]) as tmp:
                pd.DataFrame(history).to_csv(tmp, index=False)
            mlflow.log_artifact(str(paths.FINETUNE_HISTORY[kind]))
            kept = [row for row in history if row.get("best")]
            if kept:  # the epoch whose weights were kept: a fact about the run, not a curve
                mlflow.set_tag(f"{kind}.best_epoch", str(kept[-1]["epoch"]))
                mlflow.log_metrics({f"{kind}_best_val_acc": float(kept[-1]["val_acc"]),
                                    f"{kind}_val_optimism": optimism[kind]})
            log.info("%s classifier trained on %d labeled images (%s)", kind, len(train_y), settings[kind].mode)

        for kind, target in (("ssl", paths.SSL_CLASSIFIER), ("baseline", paths.BASELINE_CLASSIFIER)):
            save_torch(models[kind].state_dict(), target)

        mlflow.log_metrics({"num_labeled": len(train_y), "num_val": len(val_y)})
        info = {**spec, "class_names": data.meta["class_names"], "mode": params.finetune.mode,
                "val_optimism": optimism}
        write_json(paths.CLASSIFIER_INFO, info)
    return info


def _epoch_logger(phase: str):
    """An epoch callback (``ssl_lib.finetune.finetune_pair``'s) that logs a history row's numbers as
    ``<kind>_<phase><column>`` at step = its epoch.

    ``best`` (a flag on the epochs that became the kept one) is no curve: it is logged once, as a tag.
    """
    import mlflow

    def log_epoch(kind: str, row: dict) -> None:
        mlflow.log_metrics({f"{kind}_{phase}{k}": float(v) for k, v in row.items() if k not in ("epoch", "best")},
                           step=int(row["epoch"]))

    return log_epoch


if __name__ == "__main__":
    run_stage_cli("finetune", run)
