"""Model-registry bookkeeping: test metrics on each model version, and the `champion` alias.

A pipeline run only crowns a first champion (so `models:/NAME@champion` always resolves); moving the
alias to a newer version is the retraining flow's decision, made against a margin on one test split.
"""
from __future__ import annotations

import logging

log = logging.getLogger("sslpipe.registry")

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"


def record_metrics(name: str, version: str, metrics: dict[str, float]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, key, f"{value:.6f}")


def champion_version(name: str):
    """The ModelVersion behind the `champion` alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def crown_if_no_champion(name: str, version: str) -> bool:
    """Point `champion` at ``version`` when the model has no champion yet; report whether it did."""
    from mlflow import MlflowClient

    if champion_version(name) is not None:
        return False
    client = MlflowClient()
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion_decision", "promoted: first champion")
    log.info("%s v%s is the first champion", name, version)
    return True


def promote(name: str, version: str, reason: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_model_version_tag(name, version, "promotion_decision", f"promoted: {reason}")
    client.set_registered_model_alias(name, CHAMPION, version)
