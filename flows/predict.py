"""Batch predictions as a Prefect flow, for scheduling next to retraining."""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.stages import retry_unless_user_error
from tasks.environment import configure_environment


@task(name="predict", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def predict_task(source: str, model_uri: str, output: str) -> dict:
    from tasks.predict import predict

    table = predict(source, model_uri, output)
    return {"rows": len(table), "errors": int((table["status"] == "error").sum())}


@flow(name="ssl-predict", log_prints=True)
def predict_flow(source: str, model_uri: str | None = None, output: str = "predictions.csv") -> dict:
    """Predict every image of ``source`` (a folder, or ``split:NAME`` of the prepared data) with ``model_uri``
    (default: the champion of the data the project's params.yaml names)."""
    configure_environment()
    if model_uri is None:
        from ssl_lib.config import load_params
        from tasks.environment import project_root
        from tasks.registry import champion_uri

        model_uri = champion_uri(load_params(project_root() / "params.yaml"))
    result = predict_task(source, model_uri, output)
    get_run_logger().info("%d predictions, %d unreadable images -> %s", result["rows"], result["errors"], output)
    create_markdown_artifact(key="predictions", markdown=f"{result['rows']} rows from `{source}` with "
                                                         f"`{model_uri}` ({result['errors']} unreadable) → `{output}`")
    return result
