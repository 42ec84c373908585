"""The pipeline flow: the six stages as Prefect tasks (built in flows.stages), each run through DVC.

DVC decides what is stale (dvc.lock is the one record of what was built), Prefect schedules,
retries and shows each stage's state and duration, and MLflow gets one parent run per flow run
with a nested run per stage. The result is also saved as a DVC experiment (`dvc exp show`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.stages import StageOutcome, dvc_command, stage_tasks, subprocess_env
from tasks import paths
from tasks.checkout_lock import hold_checkout
from tasks.common import STAGES
from tasks.environment import configure_environment, project_root
from tasks.params_file import apply_param_overrides, params_with_overrides
from tasks.preflight import check_label_budget
from tasks.registry import check_same_task, registered_model
from tasks.run_summary import (
    committed_params,
    headline_metrics,
    inherited_note,
    param_changes,
    plan_against_actual,
    run_title,
)
from tasks.tracking import (
    DESCRIPTION_TAG,
    PARENT_RUN_ENV,
    PREFECT_RUN_ENV,
    attach_model,
    check_store_writable,
    close_run,
    describe_parent_run,
    experiment_url,
    log_plan,
    log_planned_minutes,
    log_results,
    log_stage_times,
    open_parent_run,
    record_data,
    run_url,
)

# A sqlite or file store has no UI of its own: the link is where `make ui` (mlflow ui) serves it.
LOCAL_UI_NOTE = " (a local store: start the UI with `make ui` to open the link)"
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

    flow_started = time.perf_counter()
    configure_environment()
    logger = get_run_logger()
    root_path = Path(root).resolve() if root else project_root()
    # Before params.yaml is touched: a second run in this checkout stops here (tasks.checkout_lock).
    with hold_checkout(root_path):
        check_store_writable()
        shortcuts = {"pretrain.method": method, "pretrain.epochs": epochs, "data.labels_per_class": labels_per_class}
        overrides = {**(overrides or {}), **{k: v for k, v in shortcuts.items() if v is not None}}
        if labels_per_class is not None:
            overrides["data.label_fraction"] = None
        inherited = inherited_note(root_path, overrides)  # before the overrides are written into the file
        if inherited:
            logger.warning(inherited)
        # Every check before params.yaml is written: a run that stops on a user mistake leaves the file as it was.
        params = params_with_overrides(root_path / "params.yaml", overrides)
        from ssl_lib.plan import plan_run  # torch, for the probe: imported once the params are known to be valid

        shape = check_label_budget(params, root_path)
        check_same_task(registered_model(params), shape.num_classes,
                        (shape.channels, shape.height, shape.width))
        plan, budget_overrides = plan_run(params, shape)
        # The budget's overrides are written like any other, so the stages, dvc.lock and MLflow record what ran.
        overrides = {**overrides, **budget_overrides}
        params = apply_param_overrides(root_path / "params.yaml", overrides)
        for line in plan.describe().splitlines():
            logger.info(line)

        started = time.perf_counter()
        flow_run_id = str(flow_run.id) if flow_run.id else f"local-{time.time_ns()}"
        changes = param_changes(params, committed_params(root_path), fallback=overrides)
        parent_id = open_parent_run(params, invocation=f"prefect-{flow_run_id}", owner="prefect",
                                    run_name=run_title(params, changes, flow_run.name or time.strftime("%H:%M:%S")),
                                    extra_tags={"prefect.flow_run_id": flow_run_id})
        log_plan(parent_id, plan)
        env = {PARENT_RUN_ENV: parent_id, PREFECT_RUN_ENV: flow_run_id, "SSLPIPE_ROOT": str(root_path)}
        outcomes: list[StageOutcome] = []
        exp_name = None
        succeeded = False
        try:
            for stage_task in stage_tasks().values():
                # Its state, then its result: a stage DVC skipped ends in a state of its own (flows.stages.SKIPPED).
                state = stage_task(str(root_path), env, force=force, return_state=True)
                outcomes.append(state.result())
            if not outcomes[-1].executed:
                # Nothing was re-evaluated: the parent run still carries the results it stands for.
                metrics = json.loads((root_path / paths.METRICS).read_text())
                log_results(parent_id, headline_metrics(metrics), [root_path / f for f in paths.RESULT_FILES])
                _attach_final_model(parent_id, root_path)
            if save_experiment:
                exp_name = save_dvc_experiment(root_path, _experiment_name(params.pretrain.method, flow_run.name))
            succeeded = True
        finally:
            failed = None if succeeded or len(outcomes) >= len(STAGES) else STAGES[len(outcomes)]

            def write_description() -> None:
                log_planned_minutes(parent_id, plan)
                log_stage_times(parent_id, [dataclasses.asdict(o) for o in outcomes],
                                time.perf_counter() - flow_started, started - flow_started)
                record_data(parent_id, params, root_path)
                describe_parent_run(parent_id, params, ran=[o.stage for o in outcomes if o.executed],
                                    skipped=[o.stage for o in outcomes if not o.executed], dvc_experiment=exp_name,
                                    failed_stage=failed, overrides=overrides,
                                    timing=plan_against_actual(plan, {o.stage: o.seconds for o in outcomes},
                                                               time.perf_counter() - started))

            close_run(parent_id, succeeded, write_description)

        from mlflow import MlflowClient

        metrics = json.loads((root_path / paths.METRICS).read_text())
        parent = MlflowClient().get_run(parent_id)
        url, local_ui = run_url(parent_id, parent.info.experiment_id)
        summary = {"mlflow_run_id": parent_id, "mlflow_run_name": parent.info.run_name, "mlflow_run_url": url,
                   "mlflow_experiment_url": experiment_url(parent.info.experiment_id),
                   "mlflow_local_ui": local_ui, "dvc_experiment": exp_name, "metrics": metrics,
                   "stages": [_stage_row(o) for o in outcomes]}
        actual = {o.stage: o.seconds for o in outcomes}
        summary["plan"] = [{**row, "actual_minutes": None if actual.get(row["stage"]) is None
                            else round(actual[row["stage"]] / 60, 2)} for row in plan.rows()]
        summary["planned_minutes"] = None if plan.total_seconds is None else round(plan.total_seconds / 60, 2)
        create_table_artifact(key="pipeline-stages", table=summary["stages"], description="What DVC ran or skipped")
        create_table_artifact(key="pipeline-plan", table=summary["plan"],
                              description="The plan made before any compute (steps, estimated minutes) against the run")
        create_markdown_artifact(key="pipeline-result", markdown=_result_markdown(parent, url, local_ui, exp_name),
                                 description="Test accuracies, the MLflow run and the DVC experiment")
        create_link_artifact(key="pipeline-mlflow-run", link=url, link_text=f"MLflow run {parent.info.run_name}",
                             description="The MLflow parent run of this flow run" + (LOCAL_UI_NOTE if local_ui else ""))
        logger.info("baseline %.4f, SSL %.4f%s; MLflow run %s", metrics["baseline"]["accuracy"],
                    metrics["ssl"]["accuracy"], f", SSL + self-training {metrics['self_train']['accuracy']:.4f}"
                    if "self_train" in metrics else "", url)
        return summary


def _attach_final_model(parent_id: str, root: Path) -> None:
    """The final model DVC kept, on a parent run whose stages were all up to date (when it is in this store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model_id = (json.loads((root / paths.FINAL_INFO).read_text()).get("registered_model") or {}).get("model_id")
    if not model_id:
        return
    try:
        mlflow.get_logged_model(model_id)
    except MlflowException:
        return  # logged in another tracking store (outputs pulled with `dvc pull`)
    attach_model(parent_id, model_id)


def _result_markdown(parent: Any, url: str, local_ui: bool, exp_name: str | None) -> str:
    """The result artifact: the run's description (headline, changes, commit, what DVC did) under a link to it."""
    link = f"**MLflow run [{parent.info.run_name}]({url})**" + (LOCAL_UI_NOTE if local_ui else "")
    dvc = (f"DVC experiment `{exp_name}` (`dvc exp show`, `dvc exp apply {exp_name}`)." if exp_name
           else "Not saved as a DVC experiment.")
    return "\n\n".join([link, parent.data.tags.get(DESCRIPTION_TAG, ""), dvc])
