"""A champion is measured only on a test split it never trained on (issue #28): another seed draws another test
split of the same data, holding images the champion trained on; the comparison then says why it was not made."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssl_lib.data.ingest import ingest
from ssl_lib.data.prepared import SEEN_KEYS_FILE, key_digests, load_prepared


@pytest.fixture()
def store(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SSLPIPE_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


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
    assert not decision.promoted and "cannot be measured" in decision.text and "it trained on" in decision.text
