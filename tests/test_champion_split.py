"""A champion is measured only on a test split it never trained on (issue #28): another seed draws another test
split of the same data, holding images the champion trained on; the comparison then says why it was not made."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssl_lib.data.ingest import ingest
from ssl_lib.data.prepared import SEEN_KEYS_FILE, key_digests, load_prepared


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An MLflow store of this module's (created once: it takes seconds); each test registers its own model."""
    import mlflow

    root = tmp_path_factory.mktemp("store")
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSLPIPE_ROOT", str(root))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")  # as experiment_id() sets it, for MlflowClient()
        yield root
    mlflow.set_tracking_uri(before)


def _register(name: str, seen: np.ndarray, tmp: Path) -> str:
    """A version whose run recorded ``seen`` as what it trained on, as the self_train stage records it."""
    from mlflow import MlflowClient

    from tasks.tracking import experiment_id

    client = MlflowClient()
    run = client.create_run(experiment_id())
    np.save(tmp / SEEN_KEYS_FILE, seen, allow_pickle=False)
    client.log_artifact(run.info.run_id, str(tmp / SEEN_KEYS_FILE))
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, source="file:///nowhere", run_id=run.info.run_id).version)


def test_a_champion_that_trained_on_this_test_split_is_not_measured_on_it(store: Path, tmp_path: Path, monkeypatch):
    import tasks.predict
    from ssl_lib.errors import DataError
    from tasks.registry import apply_champion_rule, measure_on_unseen_test

    def seen_with(seed: int) -> np.ndarray:
        out = tmp_path / f"seed{seed}"
        ingest("digits", None, seed, 5, None, 3, 0.2, out)
        manifest = load_prepared(out).manifest
        return np.unique(key_digests(manifest.loc[manifest["split"] != "test", "key"].tolist()))

    other_seed, same_seed = seen_with(1), seen_with(0)
    prepared = tmp_path / "seed0"  # this run's data: seed 0
    monkeypatch.setattr(tasks.predict, "split_accuracy", lambda uri, prepared_dir: 0.9)  # no real model here
    (tmp_path / "artifacts").mkdir()
    leaky = _register("m", other_seed, tmp_path / "artifacts")
    with pytest.raises(DataError, match=r"it trained on \d+ of the 359 images of this test split"):
        measure_on_unseen_test(f"models:/m/{leaky}", prepared)
    assert measure_on_unseen_test(f"models:/m/{_register('m', same_seed, tmp_path / 'artifacts')}", prepared) == 0.9

    monkeypatch.chdir(tmp_path)  # the evaluate stage measures on ./data/prepared
    (tmp_path / "data").mkdir()
    prepared.rename(tmp_path / "data/prepared")
    apply_champion_rule("m", leaky, 0.95, 0.005)  # the first champion, trained with seed 1
    decision = apply_champion_rule("m", "2", 0.9, 0.005)
    assert not decision.promoted and "is not compared with" in decision.text and "it trained on" in decision.text


def test_models_for_other_data_never_compete_for_one_alias(store: Path, monkeypatch):
    """A champion for other classes or other images stops a run that would register beside it, before compute."""
    from types import SimpleNamespace

    import mlflow.models
    from mlflow import MlflowClient

    from ssl_lib.errors import ConfigError
    from tasks.registry import CHAMPION, check_same_task

    check_same_task("task", 10, (1, 8, 8))  # no such model yet: nothing to compare with
    client = MlflowClient()
    client.create_registered_model("task")
    client.create_model_version("task", source="file:///nowhere")
    check_same_task("task", 10, (1, 8, 8))  # a version, but no champion
    client.set_registered_model_alias("task", CHAMPION, "1")
    # The champion's logged signature and metadata, as log_classifier writes them (no real model here).
    spec = SimpleNamespace(shape=(-1, 1, 8, 8))
    info = SimpleNamespace(signature=SimpleNamespace(inputs=SimpleNamespace(inputs=[spec])),
                           metadata={"class_names": [str(c) for c in range(10)]})
    monkeypatch.setattr(mlflow.models, "get_model_info", lambda uri: info)
    check_same_task("task", 10, (1, 8, 8), [str(c) for c in range(10)])  # the same task
    for args, expected in [((2, (1, 8, 8), ["cat", "dog"]), "this run's data has 2 classes of 1x8x8 images"),
                           ((10, (3, 32, 32)), "this run's data has 10 classes of 3x32x32 images"),
                           ((10, (1, 8, 8), list("abcdefghij")), "this run's data has 10 classes")]:
        with pytest.raises(ConfigError, match="its champion v1 is for 10 classes of 1x8x8 images") as raised:
            check_same_task("task", *args)
        assert expected in str(raised.value) and "--set finetune.registered_model_name=" in str(raised.value)
        assert "[" not in str(raised.value)  # plain words, no Python list of class names
