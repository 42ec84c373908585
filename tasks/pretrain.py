"""Stage 3, pretrain: train the encoder with the self-supervised method; the encoder's state_dict is the output.

With ``pretrain.devices`` (or ``nodes``) > 1 the stage re-launches itself under ``torchrun``: every process
trains its share of each batch (NCCL on GPUs, gloo on CPUs) and rank 0 alone logs to MLflow and writes the
outputs. A run that is killed leaves its checkpoint behind; running the stage again resumes from it.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ssl_lib.errors import ConfigError
from tasks import paths
from tasks.common import run_stage_cli

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams

log = logging.getLogger("sslpipe.pretrain")
RDZV_ENDPOINT_ENV = "SSLPIPE_RDZV_ENDPOINT"


def run(params: PipelineParams) -> dict | None:
    """Train (this process's share, under torchrun) and, on rank 0, log and write the outputs."""
    from ssl_lib.data.prepared import load_pool
    from ssl_lib.distributed import rank_info
    from ssl_lib.pretrain_plan import PretrainSettings

    # Memory-mapped: the engine copies the pool onto the device when it fits, or streams it.
    pool, meta = load_pool(paths.PREPARED, in_memory=False)
    settings = PretrainSettings.from_params(params, len(pool))
    if not rank_info().is_main:
        _train(pool, meta, settings, on_epoch=None)
        return None
    import mlflow

    from ssl_lib.device import select_device
    from tasks.tracking import stage_run

    section = {"seed": params.seed, "pretrain": params.pretrain.model_dump()}
    with stage_run("pretrain", params, section=section):
        mlflow.set_tag("device", str(select_device(settings.device)))
        mlflow.set_tag("processes", str(params.pretrain.world_size))
        # What the budget came to on this pool (ssl_lib.sizing): the passes and batch actually run.
        mlflow.log_params({"resolved.epochs": settings.epochs, "resolved.batch_size": settings.batch_size})

        def on_epoch(row: dict) -> None:
            metrics = {f"pretrain_{k}": float(v) for k, v in row.items() if k != "epoch"}
            mlflow.log_metrics(metrics, step=int(row["epoch"]))

        result = _train(pool, meta, settings, on_epoch)
        info = _write_outputs(result, meta, settings)
        for artifact in (paths.PRETRAIN_HISTORY, paths.ENCODER_INFO):
            mlflow.log_artifact(str(artifact))
        last = result.history[-1]
        mlflow.log_metrics({"final_loss": float(last["loss"]),
                            "total_seconds": float(sum(r.get("seconds", 0.0) for r in result.history))})
        log.info("pretrained %s/%s for %d epochs: final loss %.4f", settings.method, settings.backbone,
                 settings.epochs, last["loss"])
    # The outputs are complete: the resumable state has served its purpose.
    paths.PRETRAIN_CHECKPOINT.unlink(missing_ok=True)
    return info


def _train(pool: Any, meta: dict, settings: Any, on_epoch: Callable[[dict], None] | None) -> Any:
    from ssl_lib.pretrain import pretrain
    from tasks.pseudo_targets import load_pseudo_labels

    return pretrain(pool, meta["mean"], meta["std"], load_pseudo_labels(), settings, on_epoch=on_epoch,
                    checkpoint_path=paths.PRETRAIN_CHECKPOINT)


def _write_outputs(result: Any, meta: dict, settings: Any) -> dict:
    import pandas as pd

    from ssl_lib.io import atomic_path, save_torch, write_json

    save_torch(result.encoder_state, paths.ENCODER)
    height, width, channels = meta["shape"]
    info = {"method": settings.method, "backbone": settings.backbone, "feature_dim": result.feature_dim,
            "in_channels": channels, "image_size": height, "mean": meta["mean"],
            "std": meta["std"], "epochs": settings.epochs}
    write_json(paths.ENCODER_INFO, info)
    with atomic_path(paths.PRETRAIN_HISTORY) as tmp:
        pd.DataFrame(result.history).to_csv(tmp, index=False)
    return info


def torchrun_command(params: PipelineParams) -> list[str]:
    """The ``torchrun`` command that runs this stage with ``devices`` processes on each of ``nodes`` nodes."""
    p = params.pretrain
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={p.devices}", f"--nnodes={p.nodes}"]
    if p.nodes == 1:
        command.append("--standalone")
    else:
        endpoint = os.environ.get(RDZV_ENDPOINT_ENV)
        if not endpoint:
            raise ConfigError(f"pretrain.nodes={p.nodes} needs {RDZV_ENDPOINT_ENV}=HOST:PORT, an address every node "
                              "reaches, and the pretrain stage started on each node (`dvc repro -s pretrain`)")
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                    f"--rdzv-id={os.environ.get('SSLPIPE_RDZV_ID', 'sslpipe-pretrain')}"]
    return command + ["-m", "tasks.pretrain"]


def main(params: PipelineParams) -> None:
    from ssl_lib.device import select_device
    from ssl_lib.distributed import init_from_env, launched_by_torchrun, shutdown

    if launched_by_torchrun():
        init_from_env(select_device(params.pretrain.device).type)
        try:
            run(params)
        finally:
            shutdown()
    elif params.pretrain.world_size > 1:
        command = torchrun_command(params)
        log.info("launching %d processes: %s", params.pretrain.world_size, " ".join(command))
        returncode = subprocess.call(command)
        if returncode != 0:
            raise SystemExit(returncode)
    else:
        run(params)



if __name__ == "__main__":
    run_stage_cli("pretrain", main)
