"""Retraining moves `champion` only to a better model (the champion rule, applied by the evaluate stage of every
run); an unchanged source and params retrain nothing; a failed retrain leaves the champion untouched; new images
in the source give a new data version, on whose test split neither model trained.

The tests are one story, in order, on one project (a folder of digits PNGs that grows in the last test): each picks
up the registry where the one before left it. Four real retrain flows answer all five questions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_project, use_project

pytestmark = pytest.mark.slow

# A random head trained at this learning rate stays at chance, and no self-training lifts it: a deliberately
# weak final model.
WEAK = {"finetune.lr": 1e-7, "finetune.baseline_lr": 1e-7, "finetune.head_init": "random", "finetune.lp_epochs": 0,
        "self_train.method": "none"}
GOOD = {"finetune.lr": 3e-3, "finetune.baseline_lr": 3e-3, "finetune.epochs": 15, "finetune.head_init": "prototype",
        "finetune.lp_epochs": 5, "self_train.method": "label_propagation"}
MODEL = "retrain-classifier-folder-images"  # finetune.registered_model_name, then the source (tasks.registry)
FIRST_IMAGES, ADDED_IMAGES = 400, 50


def _write_digits(folder: Path, start: int, stop: int, prefix: str) -> None:
    """sklearn digits ``start:stop`` as PNGs in one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(start, stop):
        (folder / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(
            folder / str(digits.target[i]) / f"{prefix}{i}.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    base = tmp_path_factory.mktemp("retrain")
    _write_digits(base / "images", 0, FIRST_IMAGES, "")
    path = make_project(base / "proj", {
        "data": {"source": "folder", "path": str(base / "images")},
        "finetune": {"registered_model_name": "retrain-classifier"}})
    with pytest.MonkeyPatch.context() as patch:  # the module's tests run on it; undone after the last
        use_project(path, patch)
        yield path


@pytest.fixture(scope="module")
def first(project):
    """The first retrain: a weak model, registered as the first champion."""
    from flows.retrain import retrain

    row = retrain(margin=0.05, overrides=WEAK, root=str(project))
    return row, json.loads((project / "data/prepared/meta.json").read_text()), (project / "dvc.lock").read_text()


def _champion() -> tuple[str, dict]:
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias(MODEL, "champion")
    return str(version.version), version.tags


def test_the_first_model_becomes_the_champion(first):
    row, _, _ = first
    assert row["promoted"] and row["new_version"] == "1", row
    assert _champion()[0] == "1"


def test_unchanged_source_and_params_retrain_nothing(project, first):
    from flows.retrain import retrain

    row = retrain(margin=0.05, root=str(project))  # the overrides of the first retrain are params.yaml's now
    # DVC skipped every stage: no new version was registered, the champion stays.
    assert row["new_version"] == "1" and not row["promoted"] and row["decision"].startswith("unchanged"), row
    assert (project / "dvc.lock").read_text() == first[2]
    assert _champion()[0] == "1"


def test_a_better_model_is_promoted(project, first):
    from flows.retrain import retrain

    better = retrain(margin=0.05, overrides=GOOD, root=str(project))
    assert better["new_version"] == "2"
    assert better["new_accuracy"] > better["champion_accuracy"] + 0.05, better
    assert better["promoted"], better
    version, tags = _champion()
    assert version == "2" and tags["champion_decision"].startswith("promoted")


def test_failed_retrain_leaves_the_champion_untouched(project):
    from flows.retrain import retrain

    params_before = (project / "params.yaml").read_text()
    with pytest.raises(Exception, match="labels_per_class"):
        retrain(margin=0.0, overrides={**GOOD, "data.labels_per_class": 100000}, root=str(project))
    assert _champion()[0] == "2"
    # It stopped before any compute, and before writing its overrides: the next retrain starts from the same file.
    assert (project / "params.yaml").read_text() == params_before


def test_new_images_give_a_new_data_version_and_a_worse_model_keeps_the_champion(project, first):
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from ssl_lib.data.prepared import key_digests, load_prepared

    _, meta, _ = first
    before = load_prepared(project / "data/prepared").manifest.set_index("key")
    _write_digits(_images(project), FIRST_IMAGES, FIRST_IMAGES + ADDED_IMAGES, "new")
    worse = retrain(margin=0.05, overrides=WEAK, root=str(project))
    new_meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert new_meta["num_images"] == meta["num_images"] + ADDED_IMAGES
    assert new_meta["source_version"] != meta["source_version"]

    # The weak model loses to the champion, both judged on the new test split: the alias stays, and the new
    # version says why.
    assert worse["new_version"] == "3" and not worse["promoted"], worse
    assert worse["champion_version"] == "2" and _champion()[0] == "2"
    tags = MlflowClient().get_model_version(MODEL, "3").tags
    assert tags["champion_decision"].startswith("kept champion")
    assert float(tags["champion_test_accuracy"]) > float(tags["test_accuracy"])
    assert worse["champion_accuracy"] == pytest.approx(float(tags["champion_test_accuracy"]), abs=1e-4)

    # Every image kept its split, and neither model saw an image of the new test split: the champion trained on the
    # first data version, the new model on the second.
    data = load_prepared(project / "data/prepared")
    after = data.manifest.set_index("key")
    assert after.loc[before.index, "split"].tolist() == before["split"].tolist()
    test_digests = key_digests(data.manifest.loc[data.manifest.split == "test", "key"].tolist())
    assert len(test_digests) > 0
    for version in ("2", "3"):
        seen = _seen_keys(MODEL, version)
        assert len(seen) > 0 and not np.isin(test_digests, seen).any(), version


def _images(project: Path) -> Path:
    """The folder the project's params read images from."""
    import yaml

    return Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["path"])


def _seen_keys(name: str, version: str):
    """The key digests registered model ``name`` v``version`` recorded as seen (its run's seen_keys.npy)."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    from ssl_lib.data.prepared import SEEN_KEYS_FILE

    run_id = MlflowClient().get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        return np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SEEN_KEYS_FILE, dst_path=tmp))
