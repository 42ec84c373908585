"""The pipeline flow: the six stages as Prefect tasks (built in flows.stages), each run through DVC.

DVC decides what is stale (dvc.lock is the one record of what was built), Prefect schedules,
retries and shows each stage's state and duration, and MLflow gets one parent run per flow run
with a nested run per stage. The result is also saved as a DVC experiment (`dvc exp show`).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.stages import StageOutcome, dvc_command, stage_tasks, subprocess_env
from tasks import paths
from tasks.environment import configure_environment, project_root
from tasks.evaluate import headline_metrics
from tasks.params_file import apply_param_overrides
from tasks.preflight import check_label_budget
from tasks.tracking import PARENT_RUN_ENV, PREFECT_RUN_ENV, finish_run, open_parent_run, tag_dataset_hash

UNCACHED_OUTPUTS = (paths.SOURCE_FINGERPRINT, paths.METRICS, paths.PREDICTIONS, paths.PRETRAIN_HISTORY,
                    *paths.FINETUNE_HISTORY.values(), paths.SELF_TRAIN_HISTORY)


def save_dvc_experiment(root: Path, name: str) -> str | None:
    """Record the workspace as a DVC experiment; None (with the reason logged) where git has no commit yet."""
    logger = get_run_logger()
    env = subprocess_env()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, env=env)
    if head.returncode != 0:
        logger.warning("not a git repository with a commit: the run is not saved as a DVC experiment")
        return None
    # Outputs with `cache: false` (metrics, plot data) are plain files git does not track yet: include them.
    untracked = [arg for path in UNCACHED_OUTPUTS if (root / path).exists() for arg in ("--include-untracked", path)]
    out = subprocess.run(dvc_command(["exp", "save", "--force", "--name", name, *untracked]), cwd=root,
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        logger.warning("dvc exp save failed: %s", (out.stderr or out.stdout).strip())
        return None
    logger.info("saved as DVC experiment %s", name)
    return name


def _experiment_name(method: str, flow_run_name: str | None) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{method}-{flow_run_name or time.strftime('%Y%m%d-%H%M%S')}".lower())
    return slug.strip("-")


def _stage_row(outcome: StageOutcome) -> dict[str, Any]:
    """One row of the stages table: what DVC ran, its wall time, and (when it ran) start-up vs work."""
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {"stage": outcome.stage, "executed": outcome.executed, "seconds": rounded(outcome.seconds),
            "startup_seconds": rounded(outcome.startup_seconds), "work_seconds": rounded(outcome.work_seconds)}


@flow(name="ssl-pipeline", log_prints=True)
def ssl_pipeline(overrides: dict[str, Any] | None = None, method: str | None = None, epochs: int | None = None,
                 labels_per_class: int | None = None, root: str | None = None, force: bool = False,
                 save_experiment: bool = True) -> dict[str, Any]:
    """Run ingest → pseudo_labels → pretrain → finetune → evaluate, skipping what DVC finds up to date.

    ``overrides`` are dotted params (``{"pretrain.method": "rotation"}``); ``method``, ``epochs`` (pretraining)
    and ``labels_per_class`` are shortcuts for the common ones. All are validated and written into
    params.yaml before any compute, as `dvc exp run -S` would. A source whose files changed is re-ingested
    (the fingerprint stage tells DVC), and DVC reruns only what the new data invalidate.
    """
    from prefect.runtime import flow_run

    configure_environment()
    logger = get_run_logger()
    root_path = Path(root).resolve() if root else project_root()
    shortcuts = {"pretrain.method": method, "pretrain.epochs": epochs, "data.labels_per_class": labels_per_class}
    overrides = {**(overrides or {}), **{k: v for k, v in shortcuts.items() if v is not None}}
    if labels_per_class is not None:
        overrides["data.label_fraction"] = None
    params = apply_param_overrides(root_path / "params.yaml", overrides)
    check_label_budget(params, root_path)

    flow_run_id = str(flow_run.id) if flow_run.id else f"local-{time.time_ns()}"
    parent_id = open_parent_run(params, invocation=f"prefect-{flow_run_id}", owner="prefect",
                                run_name=f"pipeline {params.pretrain.method} {flow_run.name or ''}".strip(),
                                extra_tags={"prefect.flow_run_id": flow_run_id})
    env = {PARENT_RUN_ENV: parent_id, PREFECT_RUN_ENV: flow_run_id, "SSLPIPE_ROOT": str(root_path)}
    outcomes: list[StageOutcome] = []
    succeeded = False
    try:
        for stage_task in stage_tasks().values():
            outcomes.append(stage_task(str(root_path), env, force=force))
        if not outcomes[-1].executed:
            # Nothing was re-evaluated: the parent run still carries the results it stands for.
            from mlflow import MlflowClient

            metrics = json.loads((root_path / paths.METRICS).read_text())
            client = MlflowClient()
            for key, value in headline_metrics(metrics).items():
                client.log_metric(parent_id, key, float(value))
        exp_name = None
        if save_experiment:
            exp_name = save_dvc_experiment(root_path, _experiment_name(params.pretrain.method, flow_run.name))
        succeeded = True
    finally:
        tag_dataset_hash(parent_id)
        finish_run(parent_id, succeeded)

    metrics = json.loads((root_path / paths.METRICS).read_text())
    summary = {"mlflow_run_id": parent_id, "dvc_experiment": exp_name, "metrics": metrics,
               "stages": [_stage_row(o) for o in outcomes]}
    create_table_artifact(key="pipeline-stages", table=summary["stages"], description="What DVC ran or skipped")
    semi = (f", SSL + {'+'.join(params.self_train.steps)} **{metrics['self_train']['accuracy']:.4f}** (final model)"
            if "self_train" in metrics else "")
    create_markdown_artifact(key="pipeline-result", markdown=(
        f"Test accuracy: supervised baseline **{metrics['baseline']['accuracy']:.4f}**, SSL fine-tune "
        f"**{metrics['ssl']['accuracy']:.4f}**{semi} ({params.pretrain.method}, "
        f"{params.data.labels_per_class or params.data.label_fraction} labels/class). "
        f"MLflow run `{parent_id}`, DVC experiment `{exp_name}`."))
    logger.info("baseline %.4f, SSL %.4f%s", metrics["baseline"]["accuracy"], metrics["ssl"]["accuracy"],
                f", SSL + self-training {metrics['self_train']['accuracy']:.4f}" if "self_train" in metrics else "")
    return summary
