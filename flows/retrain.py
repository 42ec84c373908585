"""Scheduled retraining: re-ingest, rerun the pipeline, and move `champion` only to a better model.

    python -m flows.retrain serve --cron "0 3 * * *"     # needs a Prefect server (make serve starts one)
    python -m flows.retrain run --margin 0.01            # one retrain now

A retrain run
1. runs the pipeline flow (as a subflow). Its ingest step runs the fingerprint stage first, so DVC re-ingests
   exactly when the source's files changed (a new data version) and skips every stage when nothing did;
2. (the pipeline's evaluate stage compares the new version with the champion on this data version's test split:
   splits are stable across data versions, so no test image was ever trained or selected on by either model);
3. reports what the champion rule (docs/architecture.md, *Champion rule*), applied by the pipeline's evaluate stage
   as in every run, decided for the new version: a Prefect table artifact, with a link to the pipeline's MLflow run.
The alias moves in the evaluate stage's last step, so a failed run leaves the champion untouched.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from tasks import paths
from tasks.environment import configure_environment, project_root

DEFAULT_CRON = "0 3 * * *"
DEPLOYMENT_NAME = "nightly-retrain"


@task(name="source-changed", retries=1, retry_delay_seconds=5)
def source_changed(root: str) -> bool:
    """Whether the configured source differs from what data/prepared was built from (same fingerprint as DVC's)."""
    from ssl_lib.config import load_data_params
    from tasks.fingerprint import fingerprint

    prepared_meta = Path(root) / paths.PREPARED / "meta.json"
    if not prepared_meta.is_file():
        return True
    current = fingerprint(load_data_params(Path(root) / "params.yaml"), Path(root))["source_version"]
    return json.loads(prepared_meta.read_text()).get("source_version") != current


@flow(name="ssl-retrain", log_prints=True)
def retrain(margin: float | None = None, overrides: dict[str, Any] | None = None, root: str | None = None) -> dict:
    """Re-ingest if the source changed, rerun the pipeline, and report what the champion rule decided.

    The evaluate stage applies the rule, as in every run; ``margin`` sets ``evaluate.champion_margin`` for this
    run (an override like any other, written into params.yaml); None keeps params.yaml's.
    """
    from mlflow import MlflowClient

    from flows.pipeline import ssl_pipeline
    from ssl_lib.config import apply_overrides, parse_params, read_raw_params
    from tasks.registry import ACCURACY_TAG, DECISION_TAG, champion_version, registered_model
    from tasks.tracking import run_url

    configure_environment()
    logger = get_run_logger()
    root_path = str(Path(root).resolve() if root else project_root())
    overrides = {**(overrides or {}), **({"evaluate.champion_margin": margin} if margin is not None else {})}
    params = parse_params(apply_overrides(read_raw_params(Path(root_path) / "params.yaml"), overrides))
    name = registered_model(params)  # one per data source: tasks.registry.registered_name
    before = champion_version(name)  # taken before the pipeline, whose evaluate stage may move the alias
    champion = None if before is None else str(before.version)
    logger.info("source %s", "changed: DVC re-ingests it" if source_changed(root_path) else "unchanged")
    summary = ssl_pipeline(overrides=overrides, root=root_path, force=False, save_experiment=True)

    version = str(json.loads((Path(root_path) / paths.FINAL_INFO).read_text())["registered_model"]["version"])
    client = MlflowClient()
    tags = client.get_model_version(name, version).tags
    run = client.get_run(summary["mlflow_run_id"])
    evaluated = any(s["executed"] for s in summary["stages"] if s["stage"] == "evaluate")
    if not evaluated:
        decision = ("unchanged: source and params unchanged, DVC reran nothing; "
                    + (f"champion stays v{champion}" if champion else "no champion"))
    elif champion == version:
        decision = f"unchanged: nothing to retrain, v{version} is still the champion"
    else:
        decision = tags[DECISION_TAG]  # this run's evaluate stage applied the rule to this version
    champion_accuracy = run.data.metrics.get("champion_test_accuracy") if evaluated else None
    row = {"model": name, "new_version": version,
           "new_accuracy": round(float(tags[ACCURACY_TAG]), 4) if ACCURACY_TAG in tags else None,
           "champion_version": champion,
           "champion_accuracy": None if champion_accuracy is None else round(champion_accuracy, 4),
           "margin": params.evaluate.champion_margin, "promoted": decision.startswith("promoted"),
           "decision": decision}
    create_table_artifact(key="retrain-decision", table=[row], description="What the champion rule decided")
    url, _ = run_url(run.info.run_id, run.info.experiment_id)
    create_link_artifact(key="retrain-mlflow-run", link=url, link_text=f"MLflow run {run.info.run_name}")
    logger.info(decision)
    return row


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the deployment on a cron schedule (needs PREFECT_API_URL)")
    serve.add_argument("--cron", default=DEFAULT_CRON)
    margin_help = "champion margin for this run (default: evaluate.champion_margin in params.yaml)"
    serve.add_argument("--margin", type=float, default=None, help=margin_help)
    once = sub.add_parser("run", help="retrain once, now")
    once.add_argument("--margin", type=float, default=None, help=margin_help)
    args = parser.parse_args(argv)
    configure_environment()
    if args.command == "serve":
        if not os.environ.get("PREFECT_API_URL"):
            sys.exit("error: schedules need a Prefect server: run `make serve`, or set PREFECT_API_URL")
        retrain.serve(name=DEPLOYMENT_NAME, cron=args.cron, parameters={"margin": args.margin,
                                                                        "root": str(project_root())})
    else:
        from flows.stages import StageUserError
        from ssl_lib.errors import UserError

        try:
            print(retrain(margin=args.margin))
        except (UserError, StageUserError) as err:  # a user mistake: one line, no traceback
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
