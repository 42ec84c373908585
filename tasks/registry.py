"""Model-registry bookkeeping: what each version is, what it scored, and the one rule that moves `champion`.

The champion rule (docs/architecture.md, *Champion rule*): after a run registers a version, the evaluate stage
measures the current champion on that run's test split; the new version takes the alias when there is no champion
yet, or when its test accuracy beats the champion's by more than ``evaluate.champion_margin``. Every run applies it:
`sslpipe run`, `dvc repro`, `dvc exp run`, a sweep point and the retrain flow alike.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_lib.config import PipelineParams
from ssl_lib.errors import DataError
from tasks import paths

log = logging.getLogger("sslpipe.registry")

CHAMPION = "champion"
# Version tags the rule writes: the decision, and both accuracies on the test split it was taken on.
DECISION_TAG = "champion_decision"
ACCURACY_TAG = "test_accuracy"
CHAMPION_ACCURACY_TAG = "champion_test_accuracy"
# Where a version stands: "pending" from its registration (self_train) until the evaluate stage has recorded its
# scores and decision ("evaluated"); "abandoned" once the run that registered it is known to have been killed.
STATUS_TAG = "sslpipe.status"
# Listing requirements explicitly spares MLflow ~15 s of inferring them on every log_model call.
MODEL_REQUIREMENTS = ["torch", "torchvision", "numpy"]


class TestSplitSeen(DataError):
    """The champion trained on images of this run's test split: it cannot be measured there."""


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

    from tasks.dataset_digest import dataset_hash
    from tasks.run_summary import data_label, label_budget

    info = {"method": params.pretrain.method, "backbone": params.pretrain.backbone,
            "finetune_mode": params.finetune.mode, "self_train": "+".join(params.self_train.steps) or "none",
            "label_budget": label_budget(params), "data_source": params.data.source, "data": data_label(params)}
    data_version = dataset_hash(root)
    if data_version:
        info["data_version"] = data_version
    meta_path = root / paths.PREPARED / "meta.json"
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


def model_input(images) -> object:
    """Registry models take float32 (N, C, H, W) in [0, 1]; normalisation lives inside the model."""

    return (np.asarray(images, dtype=np.float32) / 255.0).transpose(0, 3, 1, 2).copy()


def log_classifier(model, example_images, registry_base: str, class_names: list[str],
                   model_params: dict[str, str] | None = None) -> dict:
    """Log and register ``model``; ``model_params`` (what it was trained from: ``provenance``) go
    on the logged model, and name it after what it is (``tasks.run_summary.model_name``). It is registered under
    ``registry_base`` (``finetune.registered_model_name``) and its data: one registered model per data source
    (``registered_name``)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from tasks.mlflow_pytorch import import_mlflow_pytorch
    from tasks.run_summary import model_name

    # Exported as it is: a model left in training mode would normalise each batch by its own statistics, and the
    # registered model would then disagree with the one that was evaluated (a self_train.method: none bug, now tested).
    model = model.eval()
    example = model_input(example_images)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, logits)
    name = model_name(model_params) if model_params else "classifier"
    target = registered_name(registry_base, model_params["data"]) if model_params else registry_base
    model_info = import_mlflow_pytorch().log_model(model, name=name, signature=signature, input_example=example,
                                          pip_requirements=MODEL_REQUIREMENTS,
                                          # a torch.export program: loads without this package installed
                                          serialization_format="pt2",
                                          registered_model_name=target, params=model_params,
                                          metadata={"class_names": list(class_names),
                                                    "input": "float32 (N, C, H, W) in [0, 1]"})
    version = getattr(model_info, "registered_model_version", None)
    log.info("registered %s version %s", target, version)
    return {"name": target, "version": str(version) if version is not None else None,
            "model_uri": model_info.model_uri, "model_id": model_info.model_id,
            "run_id": mlflow.active_run().info.run_id}


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


def measure_on_unseen_test(model_uri: str, prepared_dir: Path = paths.PREPARED) -> float:
    """A registered model's accuracy on the prepared data's test split, provided it never trained on any of its
    images: DataError otherwise, saying how many it had seen.

    What a model saw is what its run recorded (``seen_keys.npy``, key digests of every non-test image of its data).
    Another seed or test_fraction draws another test split, which can hold images the model trained on: measured
    there, it would look better than it is. A model recorded without them (an older version) is measured as before.
    """
    from ssl_lib.data.prepared import key_digests, load_prepared
    from tasks.predict import split_accuracy

    seen = _seen_keys(model_uri)
    if seen is not None:
        data = load_prepared(prepared_dir)
        manifest = data.manifest
        test = key_digests(manifest.loc[manifest["split"] == "test", "key"].tolist())
        overlap = int(np.isin(test, seen).sum())
        if overlap:
            raise TestSplitSeen(f"it trained on {overlap} of the {len(test)} images of this test split (drawn with "
                                "another seed or test_fraction); compare models on one split: the same seed and "
                                "test_fraction")
    return split_accuracy(model_uri, prepared_dir)


def _seen_keys(model_uri: str) -> np.ndarray | None:
    """The key digests the run that registered ``model_uri`` (models:/NAME/VERSION) recorded as seen, if any."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ssl_lib.data.prepared import SEEN_KEYS_FILE

    name, _, version = model_uri.removeprefix("models:/").rpartition("/")
    try:
        run_id = MlflowClient().get_model_version(name, version).run_id
        if not run_id:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SEEN_KEYS_FILE,
                                                               dst_path=tmp))
    except (MlflowException, OSError):  # none recorded (an older version), or its artifacts are gone
        return None


def check_same_task(name: str, num_classes: int, chw: tuple[int, int, int],
                    class_names: list[str] | None = None) -> None:
    """Raise ConfigError if registered model ``name`` has a champion for other classes or other images than these
    (``chw``: channels, height, width), naming the fix: models for other data are never compared with it, so
    registered under its name they could never take its alias. Checked before a run's compute and again by the
    stage that registers; a store without that model, or without a champion, passes.
    """
    from ssl_lib.errors import ConfigError

    champion = champion_version(name) if _store_exists() else None
    if champion is None:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    try:
        info = get_model_info(f"models:/{name}/{champion.version}")
    except (MlflowException, OSError):  # its files are gone: the champion rule says it cannot be measured
        return
    specs = info.signature.inputs.inputs if info.signature is not None and info.signature.inputs else []
    shape = tuple(int(d) for d in getattr(specs[0], "shape", ())[1:]) if specs else ()
    names = list((info.metadata or {}).get("class_names") or [])
    theirs = f"{len(names) or 'its'} classes of {'x'.join(map(str, shape)) or 'its'} images"
    ours = f"{num_classes} classes of {'x'.join(map(str, chw))} images"
    other_images = bool(shape) and shape != tuple(chw)
    other_classes = bool(names) and (len(names) != num_classes or
                                     (class_names is not None and names != list(class_names)))
    if other_images or other_classes:
        raise ConfigError(f"registered model {name!r}: its champion v{champion.version} is for {theirs}, this "
                          f"run's data has {ours} (the same source, other classes or images); a model for other "
                          "data is never compared with it, so register this one under a name of its own "
                          "(--set finetune.registered_model_name=<another name>)")


def _store_exists() -> bool:
    """False for a local SQLite store not created yet: asking it would create it."""
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).exists()


def apply_champion_rule(name: str, version: str, accuracy: float, margin: float,
                        measure: Callable[[str], float] | None = None) -> Decision:
    """Decide for ``version`` (test accuracy ``accuracy``), move the alias if it wins, and tag the version.

    ``measure(model_uri)`` is the test accuracy of a registered model on the same test split (by default the
    prepared data's test split, in the working directory: ``measure_on_unseen_test``); a ``UserError`` from it
    (the champion takes other images, predicts other classes, trained on images of this test split, or its files
    are gone) means it cannot be compared here, and it stays.
    """
    from mlflow import MlflowClient

    from ssl_lib.errors import UserError

    measure = measure or measure_on_unseen_test

    current = champion_version(name)
    champion = None if current is None else str(current.version)
    champion_accuracy, why = None, None
    if champion is not None and champion != version:
        # Models for other classes or images are never compared: said in words, before loading anything.
        why = data_mismatch(MlflowClient().get_model_version(name, version).tags, current.tags)
        if why is None:
            try:
                champion_accuracy = measure(f"models:/{name}/{champion}")
            except UserError as err:
                log.info("champion v%s cannot be measured: %s", champion, err)
                # The overlap with this test split is said as it is (one short clause); other reasons' own words
                # name shapes and lists of classes, so they are summed up.
                why = (str(err).split("\n")[0] if isinstance(err, TestSplitSeen) else
                       "it cannot be measured on this run's test split (other images or classes, or files gone)")
    decision = decide(version, accuracy, champion, champion_accuracy, margin, why)
    tags = {ACCURACY_TAG: f"{accuracy:.4f}"}  # tags are read by people: rounded as in every description
    if champion != version:  # re-evaluating the champion itself keeps the decision that made it one
        tags[DECISION_TAG] = decision.text
        if champion_accuracy is not None:
            tags[CHAMPION_ACCURACY_TAG] = f"{champion_accuracy:.4f}"
    elif current is not None and current.tags.get(DECISION_TAG):
        # Also what a retry finds after a kill just after the alias moved: say how it became the champion.
        decision = dataclasses.replace(decision, text=f"{decision.text}; it became the champion as "
                                                      f"{current.tags[DECISION_TAG]}")
    # The tags before the alias: a kill between the two leaves a version whose tags say what was decided, which
    # a retry decides again and completes; a champion never lacks the decision that made it one.
    tag_version(name, version, tags)
    if decision.promoted:
        MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    log.info("%s v%s: %s", name, version, decision.text)
    return decision


def abandon_versions_of(run_id: str) -> list[tuple[str, str]]:
    """Mark the versions registered by ``run_id`` (a killed run) that were never evaluated as abandoned, so that
    no READY version without scores passes for a finished one; return them as (name, version)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    abandoned = []
    for found in client.search_model_versions(f"run_id = '{run_id}'"):
        if found.tags.get(STATUS_TAG) == "evaluated" or ACCURACY_TAG in found.tags:
            continue
        client.set_model_version_tag(found.name, found.version, STATUS_TAG, "abandoned")
        client.update_model_version(found.name, found.version, description=(
            f"Abandoned: the run that registered it ({run_id}) was killed before the evaluate stage scored it. "
            "Not a candidate for champion; a rerun registers a new version."))
        abandoned.append((found.name, str(found.version)))
    return abandoned
