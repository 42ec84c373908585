"""Scheduled retraining: re-ingest, rerun the pipeline, and move `champion` only to a better model.

    python -m flows.retrain serve --cron "0 3 * * *"     # needs a Prefect server (make serve starts one)
    python -m flows.retrain run --margin 0.01            # one retrain now

A retrain run
1. re-ingests when the source changed (its fingerprint differs from data/prepared/meta.json): a new DVC
   data version; an unchanged source changes nothing and DVC skips every stage;
2. runs the pipeline flow (as a subflow);
3. evaluates the new model version and the current champion on the same test split;
4. moves `champion` to the new version only if its accuracy beats the champion's by ``margin``.
The decision and both accuracies are tags on the model version and on the pipeline's MLflow run, and a
Prefect table artifact with a link to that run. Promotion is the last step, so a failed run leaves the
champion untouched.
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
    """Whether the configured source differs from what data/prepared was built from."""
    from ssl_lib.config import load_params
    from ssl_lib.data.sources import load_source

    prepared_meta = Path(root) / paths.PREPARED / "meta.json"
    if not prepared_meta.is_file():
        return True
    params = load_params(Path(root) / "params.yaml")
    current = load_source(params.data.source, params.data.path).source_version
    return json.loads(prepared_meta.read_text()).get("source_version") != current


@task(name="test-accuracy", retries=1, retry_delay_seconds=5)
def test_accuracy(root: str, model_uri: str) -> float:
    """Accuracy of ``model_uri`` on the current test split, computed here so both models share it."""
    import tempfile

    import pandas as pd

    from ssl_lib.data.prepared import load_prepared
    from tasks.predict import predict

    prepared = Path(root) / paths.PREPARED
    with tempfile.TemporaryDirectory() as tmp:
        table = predict("split:test", model_uri, Path(tmp) / "p.csv", prepared_dir=prepared)
    data = load_prepared(prepared)
    _, labels = data.split("test")
    names = data.class_names
    predicted = pd.Series(table["predicted_class"]).map({n: i for i, n in enumerate(names)}).to_numpy()
    return float((predicted == labels).mean())


def _ui_link(run_id: str, experiment_id: str) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@flow(name="ssl-retrain", log_prints=True)
def retrain(margin: float = 0.005, overrides: dict[str, Any] | None = None, root: str | None = None) -> dict:
    """Retrain, compare with the champion on one test split, promote only a better model."""
    from mlflow import MlflowClient

    from flows.pipeline import ssl_pipeline
    from tasks.registry import CHAMPION, champion_version, promote, record_metrics

    configure_environment()
    logger = get_run_logger()
    root_path = str(Path(root).resolve() if root else project_root())
    from ssl_lib.config import apply_overrides, parse_params, read_raw_params

    params = parse_params(apply_overrides(read_raw_params(Path(root_path) / "params.yaml"), overrides or {}))
    name = params.finetune.registered_model_name
    champion = champion_version(name)  # taken before the pipeline, which crowns a first champion itself
    changed = source_changed(root_path)
    logger.info("source %s", "changed: re-ingesting" if changed else "unchanged")
    summary = ssl_pipeline(overrides=overrides, root=root_path, force=False, save_experiment=True,
                           reingest=changed)

    version = str(json.loads((Path(root_path) / paths.FINAL_INFO).read_text())["registered_model"]["version"])
    new_accuracy = test_accuracy(root_path, f"models:/{name}/{version}")
    retrained = any(s["executed"] for s in summary["stages"] if s["stage"] == "self_train")
    if not retrained and champion is not None:
        champion_accuracy, promoted = None, False
        decision = f"unchanged: source and params unchanged, DVC reran nothing; champion stays v{champion.version}"
    elif champion is None:
        champion_accuracy, promoted, decision = None, True, "promoted: no champion yet"
    elif str(champion.version) == version:
        champion_accuracy, promoted = new_accuracy, False
        decision = f"unchanged: nothing to retrain, v{version} is still the champion"
    else:
        champion_accuracy = test_accuracy(root_path, f"models:/{name}@{CHAMPION}")
        promoted = new_accuracy > champion_accuracy + margin
        decision = (f"{'promoted' if promoted else 'kept champion'}: v{version} {new_accuracy:.4f} vs "
                    f"champion v{champion.version} {champion_accuracy:.4f} (margin {margin})")
    if promoted:
        promote(name, version, decision)
    client = MlflowClient()
    if retrained or champion is None:  # an unchanged run must not overwrite the version's earlier verdict
        record_metrics(name, version, {"retrain_test_accuracy": new_accuracy,
                                       **({"retrain_champion_test_accuracy": champion_accuracy}
                                          if champion_accuracy is not None else {})})
        client.set_model_version_tag(name, version, "retrain_decision", decision)
    run_id = summary["mlflow_run_id"]
    client.set_tag(run_id, "retrain.decision", decision)
    client.log_metric(run_id, "retrain_new_test_accuracy", new_accuracy)
    if champion_accuracy is not None:
        client.log_metric(run_id, "retrain_champion_test_accuracy", champion_accuracy)

    row = {"model": name, "new_version": version, "new_accuracy": round(new_accuracy, 4),
           "champion_version": None if champion is None else str(champion.version),
           "champion_accuracy": None if champion_accuracy is None else round(champion_accuracy, 4),
           "margin": margin, "promoted": promoted, "decision": decision}
    create_table_artifact(key="retrain-decision", table=[row], description="Champion promotion decision")
    experiment_id = client.get_run(run_id).info.experiment_id
    create_link_artifact(key="retrain-mlflow-run", link=_ui_link(run_id, experiment_id),
                         link_text="MLflow run of this retrain")
    logger.info(decision)
    return row


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the deployment on a cron schedule (needs PREFECT_API_URL)")
    serve.add_argument("--cron", default=DEFAULT_CRON)
    serve.add_argument("--margin", type=float, default=0.005)
    once = sub.add_parser("run", help="retrain once, now")
    once.add_argument("--margin", type=float, default=0.005)
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
