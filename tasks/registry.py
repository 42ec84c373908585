"""Model-registry bookkeeping: record test metrics on a model version and keep the `champion` alias honest."""
from __future__ import annotations

import logging

log = logging.getLogger("sslpipe.registry")

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"


def record_and_maybe_promote(name: str, version: str, metrics: dict[str, float], margin: float = 0.0) -> bool:
    """Tag ``version`` with ``metrics``; point `champion` at it if there is none or it beats the champion.

    The comparison uses the champion's own recorded test accuracy, so promotion needs no re-evaluation
    as long as both were measured on the same test split (the dataset hash tag says whether they were).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, key, f"{value:.6f}")
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    new_accuracy = metrics[ACCURACY_TAG]
    if champion is None:
        promote, reason = True, "no champion yet"
    elif champion.version == version:
        return True
    else:
        old = float(champion.tags.get(ACCURACY_TAG, "-inf"))
        promote = new_accuracy > old + margin
        reason = f"{new_accuracy:.4f} vs champion v{champion.version} {old:.4f} (margin {margin})"
    client.set_model_version_tag(name, version, "promotion_decision",
                                 ("promoted: " if promote else "kept champion: ") + reason)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info("%s v%s %s (%s)", name, version, "is the new champion" if promote else "not promoted", reason)
    return promote
