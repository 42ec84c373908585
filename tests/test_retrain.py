"""Retraining moves `champion` only to a better model (the champion rule, applied by the evaluate stage of every
run); a failed retrain leaves it untouched."""
from __future__ import annotations

import pytest

from tests.helpers import make_project, use_project

pytestmark = pytest.mark.slow

# A random head trained at this learning rate stays at chance, and no self-training lifts it: a deliberately
# weak final model.
WEAK = {"finetune.lr": 1e-7, "finetune.baseline_lr": 1e-7, "finetune.head_init": "random", "finetune.lp_epochs": 0,
        "self_train.method": "none"}
GOOD = {"finetune.lr": 3e-3, "finetune.baseline_lr": 3e-3, "finetune.epochs": 15, "finetune.head_init": "prototype",
        "finetune.lp_epochs": 5, "self_train.method": "label_propagation"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    path = make_project(tmp_path_factory.mktemp("retrain") / "proj",
                        {"finetune": {"registered_model_name": "retrain-classifier"}})
    with pytest.MonkeyPatch.context() as patch:  # the module's tests run on it; undone after the last
        use_project(path, patch)
        yield path


def _champion() -> tuple[str, dict]:
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias("retrain-classifier-digits", "champion")
    return str(version.version), version.tags


def test_retrain_promotes_only_a_better_model(project):
    from flows.retrain import retrain

    first = retrain(margin=0.05, overrides=WEAK, root=str(project))
    assert first["promoted"] and first["new_version"] == "1"

    better = retrain(margin=0.05, overrides=GOOD, root=str(project))
    assert better["new_version"] == "2"
    assert better["new_accuracy"] > better["champion_accuracy"] + 0.05, better
    assert better["promoted"], better
    version, tags = _champion()
    assert version == "2" and tags["champion_decision"].startswith("promoted")

    worse = retrain(margin=0.05, overrides=WEAK, root=str(project))
    assert worse["new_version"] == "3" and not worse["promoted"], worse
    assert worse["champion_version"] == "2"
    assert _champion()[0] == "2"
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version("retrain-classifier-digits", "3").tags
    assert tags["champion_decision"].startswith("kept champion")
    assert float(tags["champion_test_accuracy"]) > float(tags["test_accuracy"])
    assert worse["champion_accuracy"] == pytest.approx(float(tags["champion_test_accuracy"]), abs=1e-4)


def test_unchanged_source_and_params_retrain_nothing(project):
    from flows.retrain import retrain

    row = retrain(margin=0.05, root=str(project))
    # DVC skipped every stage: no new version was registered, the champion stays.
    assert row["new_version"] == "3" and not row["promoted"] and row["decision"].startswith("unchanged")
    assert _champion()[0] == "2"


def test_failed_retrain_leaves_the_champion_untouched(project):
    from flows.retrain import retrain

    with pytest.raises(Exception, match="labels_per_class"):
        retrain(margin=0.0, overrides={**GOOD, "data.labels_per_class": 100000}, root=str(project))
    assert _champion()[0] == "2"


def test_new_images_in_the_source_give_a_new_data_version(tmp_path, prefect_server, monkeypatch):
    import json

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from flows.retrain import retrain
    from ssl_lib.data.prepared import key_digests, load_prepared

    digits = load_digits()
    images = tmp_path / "images"
    for i, (image, label) in enumerate(zip(digits.images[:400], digits.target[:400], strict=True)):
        (images / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(images / str(label) / f"{i}.png")
    project = make_project(tmp_path / "proj", {
        "data": {"source": "folder", "path": str(images), "labels_per_class": 3, "val_per_class": 2},
        "finetune": {"registered_model_name": "folder-classifier"}})
    use_project(project, monkeypatch)
    first = retrain(margin=0.0, root=str(project))
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    lock_before = (project / "dvc.lock").read_text()

    again = retrain(margin=0.0, root=str(project))  # nothing changed: nothing reruns
    assert again["decision"].startswith("unchanged") and (project / "dvc.lock").read_text() == lock_before

    before = load_prepared(project / "data/prepared").manifest.set_index("key")
    for i, (image, label) in enumerate(zip(digits.images[400:450], digits.target[400:450], strict=True)):
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(images / str(label) / f"new{i}.png")
    changed = retrain(margin=0.0, root=str(project))
    new_meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert new_meta["num_images"] == meta["num_images"] + 50
    assert new_meta["source_version"] != meta["source_version"]
    assert int(changed["new_version"]) == int(first["new_version"]) + 1

    # The evaluate stage compared the two on the new test split, which neither model had seen: the champion
    # trained on the first data version, whose images all kept their splits, the new model on the second.
    data = load_prepared(project / "data/prepared")
    after = data.manifest.set_index("key")
    assert after.loc[before.index, "split"].tolist() == before["split"].tolist()
    test_digests = key_digests(data.manifest.loc[data.manifest.split == "test", "key"].tolist())
    assert len(test_digests) > 0
    for version in (first["new_version"], changed["new_version"]):
        seen = _seen_keys("folder-classifier-folder-images", version)
        assert len(seen) > 0 and not np.isin(test_digests, seen).any(), version
    assert "champion" in changed["decision"] or changed["decision"].startswith("promoted"), changed


def _seen_keys(name: str, version: str):
    """The key digests registered model ``name`` v``version`` recorded as seen (its run's seen_keys.npy)."""
    import tempfile

    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from ssl_lib.data.prepared import SEEN_KEYS_FILE

    run_id = MlflowClient().get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        return np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SEEN_KEYS_FILE, dst_path=tmp))
