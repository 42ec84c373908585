"""Stage 3, pretrain: train the encoder with the self-supervised method; the encoder's state_dict is the output."""
from __future__ import annotations

import logging

import pandas as pd

from ssl_lib.config import PipelineParams
from tasks import paths
from tasks.common import make_stage_task, run_stage_cli

log = logging.getLogger("sslpipe.pretrain")


def run(params: PipelineParams) -> dict:
    import mlflow

    from ssl_lib.data import load_pool
    from ssl_lib.device import select_device
    from ssl_lib.io import atomic_path, save_torch, write_json
    from ssl_lib.pretrain import pretrain
    from tasks.pseudo_labels import load_pseudo_labels
    from tasks.settings import pretrain_settings
    from tasks.tracking import stage_run

    settings = pretrain_settings(params)
    section = {"seed": params.seed, "pretrain": params.pretrain.model_dump()}
    with stage_run("pretrain", params, section=section):
        pool, meta = load_pool(paths.PREPARED)
        mlflow.set_tag("device", str(select_device(settings.device)))

        def on_epoch(row: dict) -> None:
            metrics = {f"pretrain_{k}": float(v) for k, v in row.items() if k != "epoch"}
            mlflow.log_metrics(metrics, step=int(row["epoch"]))

        result = pretrain(pool, meta["mean"], meta["std"], load_pseudo_labels(), settings,
                          on_epoch=on_epoch)
        save_torch(result.encoder_state, paths.ENCODER)
        height, width, channels = meta["shape"]
        info = {"method": settings.method, "backbone": settings.backbone, "feature_dim": result.feature_dim,
                "in_channels": channels, "image_size": height, "mean": meta["mean"],
                "std": meta["std"], "epochs": settings.epochs}
        write_json(paths.ENCODER_INFO, info)
        history = pd.DataFrame(result.history)
        with atomic_path(paths.PRETRAIN_HISTORY) as tmp:
            history.to_csv(tmp, index=False)
        last = result.history[-1]
        mlflow.log_metrics({"final_loss": float(last["loss"]),
                            "total_seconds": float(sum(r.get("seconds", 0.0) for r in result.history))})
        log.info("pretrained %s/%s for %d epochs: final loss %.4f", settings.method, settings.backbone,
                 settings.epochs, last["loss"])
    return info


pretrain_task = make_stage_task("pretrain")

if __name__ == "__main__":
    run_stage_cli("pretrain", run)
