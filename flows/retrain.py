"""Scheduled retraining: re-ingest, rerun the pipeline, and move `champion` only to a better model.

    python -m flows.retrain serve --cron "0 3 * * *"     # needs a Prefect server (make serve starts one)
    python -m flows.retrain run --margin 0.01            # one retrain now

A retrain run
1. runs the pipeline flow (as a subflow). Its ingest step runs the fingerprint stage first, so DVC re-ingests
   exactly when the source's files changed (a new data version) and skips every stage when nothing did;
2. evaluates the new model version and the current champion on the same test images: the current test split
   less any image either model has trained or been selected on (each registered model records what it saw).
   Splits are stable across data versions, so that is normally the whole test split;
3. moves `champion` to the new version only if its accuracy beats the champion's by ``margin``.
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

import numpy as np
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


def _seen_keys(name: str, version: str) -> np.ndarray | None:
    """The key digests model ``name`` v``version`` was trained and selected on, or None if it did not record them."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ssl_lib.data.prepared import SEEN_KEYS_FILE

    run_id = MlflowClient().get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SEEN_KEYS_FILE, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return np.load(local, allow_pickle=False)


@task(name="fair-test-split", retries=1, retry_delay_seconds=5)
def fair_test_split(root: str, name: str, versions: list[str]) -> dict[str, Any]:
    """Positions in the current test split of the images none of model ``name``'s ``versions`` has seen.

    Also how many test images there are, how many were left out, and the versions that recorded nothing (then
    only the test split's stability across data versions vouches for them).
    """
    from ssl_lib.data.prepared import key_digests, load_prepared

    data = load_prepared(Path(root) / paths.PREPARED)
    test = data.indices("test")
    digests = key_digests(data.manifest["key"].to_numpy()[test].tolist())
    keep = np.ones(len(test), dtype=bool)
    unknown = []
    for version in versions:
        seen = _seen_keys(name, version)
        if seen is None:
            unknown.append(version)
        else:
            keep &= ~np.isin(digests, seen)
    return {"rows": np.flatnonzero(keep).tolist(), "test_images": len(test), "excluded": int((~keep).sum()),
            "unrecorded_versions": unknown}


@task(name="test-accuracy", retries=1, retry_delay_seconds=5)
def test_accuracy(root: str, model_uri: str, rows: list[int]) -> float:
    """Accuracy of ``model_uri`` on the test images at ``rows`` (positions in the test split), computed here so
    both models share them."""
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
    return float((predicted[rows] == labels[rows]).mean()) if rows else float("nan")


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
    logger.info("source %s", "changed: DVC re-ingests it" if source_changed(root_path) else "unchanged")
    summary = ssl_pipeline(overrides=overrides, root=root_path, force=False, save_experiment=True)

    version = str(json.loads((Path(root_path) / paths.FINAL_INFO).read_text())["registered_model"]["version"])
    compared = [version] + ([str(champion.version)] if champion is not None and str(champion.version) != version
                            else [])
    fair = fair_test_split(root_path, name, compared)
    rows = fair["rows"]
    new_accuracy = test_accuracy(root_path, f"models:/{name}/{version}", rows)
    on = (f"on the {len(rows)} of {fair['test_images']} test images neither model has seen"
          + (f" (unrecorded for v{', v'.join(fair['unrecorded_versions'])})" if fair["unrecorded_versions"] else ""))
    retrained = any(s["executed"] for s in summary["stages"] if s["stage"] == "self_train")
    if not retrained and champion is not None:
        champion_accuracy, promoted = None, False
        decision = f"unchanged: source and params unchanged, DVC reran nothing; champion stays v{champion.version}"
    elif champion is None:
        champion_accuracy, promoted, decision = None, True, "promoted: no champion yet"
    elif str(champion.version) == version:
        champion_accuracy, promoted = new_accuracy, False
        decision = f"unchanged: nothing to retrain, v{version} is still the champion"
    elif not rows:
        champion_accuracy, promoted = None, False
        decision = (f"kept champion: no test image left that neither v{version} nor champion v{champion.version} "
                    f"has seen ({fair['excluded']} excluded); the test split changed (seed, test_fraction or test/ "
                    "folder), so the models cannot be compared fairly")
    else:
        champion_accuracy = test_accuracy(root_path, f"models:/{name}@{CHAMPION}", rows)
        promoted = new_accuracy > champion_accuracy + margin
        decision = (f"{'promoted' if promoted else 'kept champion'}: v{version} {new_accuracy:.4f} vs "
                    f"champion v{champion.version} {champion_accuracy:.4f} (margin {margin}) {on}")
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
    client.log_metric(run_id, "retrain_test_images", len(rows))
    if champion_accuracy is not None:
        client.log_metric(run_id, "retrain_champion_test_accuracy", champion_accuracy)

    row = {"model": name, "new_version": version, "new_accuracy": round(new_accuracy, 4),
           "test_images": len(rows), "test_images_excluded": fair["excluded"],
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
