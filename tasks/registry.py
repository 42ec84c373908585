"""Model-registry bookkeeping: what each version is, what it scored, and the one rule that moves `champion`.

The champion rule (README, *Champion rule*): after a run registers a version, the evaluate stage measures the
current champion on that run's test split; the new version takes the alias when there is no champion yet, or
when its test accuracy beats the champion's by more than ``evaluate.champion_margin``. Every run applies it:
`sslpipe run`, `dvc repro`, `dvc exp run`, a sweep point and the retrain flow alike.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ssl_lib.config import PipelineParams

log = logging.getLogger("sslpipe.registry")

CHAMPION = "champion"
# Version tags the rule writes: the decision, and both accuracies on the test split it was taken on.
DECISION_TAG = "champion_decision"
ACCURACY_TAG = "test_accuracy"
CHAMPION_ACCURACY_TAG = "champion_test_accuracy"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    text: str  # starts with "promoted", "kept champion" or "unchanged"
    champion: str | None = None  # the champion version it was compared with
    champion_accuracy: float | None = None


def registered_name(base: str, data: str) -> str:
    """The registered model a final model goes to: ``finetune.registered_model_name`` and the data it was trained
    on (``tasks.run_summary.data_label``), e.g. ``ssl-pipeline-classifier-digits``. One registered model per data
    source, so a champion is only ever challenged by models of the same data."""
    import re

    return f"{base}-{re.sub(r'[^a-z0-9]+', '-', data.lower()).strip('-')}"


def registered_model(params: PipelineParams) -> str:
    """The registered model of the data ``params`` name."""
    from tasks.run_summary import data_label

    return registered_name(params.finetune.registered_model_name, data_label(params))


def champion_uri(params: PipelineParams) -> str:
    """``models:/<registered model>@champion``: what `sslpipe predict` loads unless told otherwise."""
    return f"models:/{registered_model(params)}@{CHAMPION}"


def provenance(params: PipelineParams, root: Path = Path(".")) -> dict[str, str]:
    """What a registered version was trained from: method, label budget, data (its DVC version, classes and image
    shape, which decide whether two versions can be compared: ``data_mismatch``).

    ``root`` is the workspace whose dvc.lock and prepared data describe the data (a stage runs in its own, temp or
    not).
    """
    import hashlib
    import json

    from tasks.run_summary import data_label, label_budget
    from tasks.tracking import PREPARED_DATA, dataset_hash

    info = {"method": params.pretrain.method, "backbone": params.pretrain.backbone,
            "finetune_mode": params.finetune.mode, "self_train": "+".join(params.self_train.steps) or "none",
            "label_budget": label_budget(params), "data_source": params.data.source, "data": data_label(params)}
    data_version = dataset_hash(root)
    if data_version:
        info["data_version"] = data_version
    meta_path = root / PREPARED_DATA / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        names = json.dumps(meta["class_names"]).encode()
        info.update({"num_classes": str(len(meta["class_names"])), "class_set": hashlib.md5(names).hexdigest()[:8],
                     "image_shape": "x".join(str(n) for n in meta["shape"])})
    return info


# The tags that say what a version predicts and from what images: versions that differ in one are not compared.
DATA_KEYS = ("class_set", "image_shape")


def data_mismatch(mine: dict[str, str], theirs: dict[str, str]) -> str | None:
    """Why two versions (by their tags) are not compared, in words; None when they may be (or when one of them,
    registered before these tags existed, does not say: measuring it then decides)."""
    if not all(key in tags for tags in (mine, theirs) for key in DATA_KEYS):
        return None
    if all(mine[key] == theirs[key] for key in DATA_KEYS):
        return None

    def data(tags: dict[str, str]) -> str:
        source, classes = tags.get("data_source", "other data"), tags.get("num_classes", "?")
        return f"{source} ({classes} classes of {tags['image_shape']})"

    if data(mine) == data(theirs):
        return f"it predicts other classes than this run's {data(mine)}"
    return f"it was trained for {data(theirs)}, this run for {data(mine)}"


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def record_metrics(name: str, version: str, metrics: dict[str, float]) -> None:
    tag_version(name, version, {key: f"{value:.4f}" for key, value in metrics.items()})  # read by people


def describe_version(name: str, version: str, text: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().update_model_version(name, version, description=text)


def logged_model_id(name: str, version: str) -> str | None:
    """The id of the logged model behind a registered version (MLflow 3), which its metrics are logged on."""
    from mlflow import MlflowClient

    found = MlflowClient().get_model_version(name, version)
    if found.model_id:
        return found.model_id
    # A SQL registry does not keep the id, but the version's source is the logged model's URI: models:/<id>.
    source = found.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def champion_version(name: str):
    """The ModelVersion behind the `champion` alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(version: str, accuracy: float, champion: str | None, champion_accuracy: float | None, margin: float,
           why_not_measured: str | None = None) -> Decision:
    """The champion rule, as a pure function of the two versions and their accuracies on one test split."""
    if champion is None:
        return Decision(True, f"promoted: first champion (v{version}, test accuracy {accuracy:.4f})")
    if champion == version:
        return Decision(False, f"unchanged: v{version} is the champion (test accuracy {accuracy:.4f})", champion)
    if champion_accuracy is None:
        return Decision(False, f"kept champion: v{champion} is not compared with v{version}: {why_not_measured}",
                        champion)
    promoted = accuracy > champion_accuracy + margin
    verb = "promoted" if promoted else "kept champion"
    relation = "beats" if promoted else "does not beat"
    return Decision(promoted, f"{verb}: v{version} {accuracy:.4f} {relation} champion v{champion} "
                              f"{champion_accuracy:.4f} by more than the margin {margin:g}", champion,
                    champion_accuracy)


def apply_champion_rule(name: str, version: str, accuracy: float, margin: float,
                        measure: Callable[[str], float] | None = None) -> Decision:
    """Decide for ``version`` (test accuracy ``accuracy``), move the alias if it wins, and tag the version.

    ``measure(model_uri)`` is the test accuracy of a registered model on the same test split (by default the
    prepared data's test split, in the working directory); a ``UserError`` from it (the champion takes other
    images or predicts other classes, or its files are gone) means it cannot be compared here, and it stays.
    """
    from mlflow import MlflowClient

    from ssl_lib.errors import UserError
    from tasks.predict import split_accuracy

    measure = measure or split_accuracy

    current = champion_version(name)
    champion = None if current is None else str(current.version)
    champion_accuracy, why = None, None
    if champion is not None and champion != version:
        # Models for other classes or images are never compared: said in words, before loading anything.
        why = data_mismatch(MlflowClient().get_model_version(name, version).tags, current.tags)
        if why is None:
            try:
                champion_accuracy = measure(f"models:/{name}/{champion}")
            except UserError as err:  # its own words name shapes and lists of classes: logged, not shown
                log.info("champion v%s cannot be measured: %s", champion, err)
                why = "it cannot be measured on this run's test split (other images or classes, or files gone)"
    decision = decide(version, accuracy, champion, champion_accuracy, margin, why)
    if decision.promoted:
        MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    tags = {ACCURACY_TAG: f"{accuracy:.4f}"}  # tags are read by people: rounded as in every description
    if champion != version:  # re-evaluating the champion itself keeps the decision that made it one
        tags[DECISION_TAG] = decision.text
        if champion_accuracy is not None:
            tags[CHAMPION_ACCURACY_TAG] = f"{champion_accuracy:.4f}"
    tag_version(name, version, tags)
    log.info("%s v%s: %s", name, version, decision.text)
    return decision
