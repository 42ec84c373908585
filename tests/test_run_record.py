"""How a run is named, described and shown, without running one: run names, descriptions, the MLflow link,
the per-class table, progress lines in a log, and the LP-FT phase's epoch rows."""
from __future__ import annotations

import io

import numpy as np

from ssl_lib.config import parse_params
from tasks.run_summary import describe, headline, param_changes, run_title

BASE = {"data": {"source": "digits", "labels_per_class": 10, "label_fraction": None}}


def _params(**sections):
    raw = {key: dict(value) for key, value in BASE.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_params(raw)


def test_a_run_name_says_what_differs_from_the_committed_params():
    params = _params(finetune={"lp_epochs": 40})
    changes = param_changes(params, BASE)
    assert changes == {"finetune.lp_epochs": 40}
    assert run_title(params, changes, "papaya-pelican") == "simclr 10/class lp_epochs=40 · papaya-pelican"
    # A key several sections share is qualified; the method and the budget lead the name instead of repeating.
    params = _params(pretrain={"method": "rotation", "epochs": 3}, data={"labels_per_class": 50})
    title = run_title(params, param_changes(params, BASE), "x")
    assert title == "rotation 50/class pretrain.epochs=3 · x"
    params = _params(data={"labels_per_class": None, "label_fraction": 0.05}, self_train={"method": "none"})
    assert run_title(params, param_changes(params, BASE)) == "simclr 5% labeled self_train.method=none"


def test_a_long_list_of_changes_is_cut_and_a_missing_baseline_falls_back_to_the_overrides():
    params = _params(finetune={"lp_epochs": 1, "lp_lr": 0.1, "head_init": "random", "augment": False})
    title = run_title(params, param_changes(params, BASE))
    assert title.endswith("+1 more") and title.count("=") == 3
    assert param_changes(params, None, fallback={"finetune.lp_epochs": 1}) == {"finetune.lp_epochs": 1}
    # A committed params.yaml this code no longer accepts is no baseline either.
    assert param_changes(params, {"no_such_section": {}}, fallback={}) == {}


def test_the_description_rounds_the_result_and_says_what_ran():
    params = _params()
    metrics = {"test_accuracy_ssl": 0.7093, "test_accuracy_baseline": 0.6962, "test_accuracy_self_train": 0.7475,
               "ssl_gain": 0.013100000000000056}
    text = describe(params, metrics, {"finetune.lp_epochs": 40}, "0123456789abcdef0123", ["finetune", "evaluate"],
                    ["ingest"], dvc_experiment="simclr-papaya", model="`m` v2, promoted: first champion")
    assert "**SSL + label_propagation: test accuracy 0.7475**, 5.1 points above the supervised-only baseline" in text
    assert "`finetune.lp_epochs=40`" in text and "`0123456789ab`" in text
    assert "DVC ran finetune, evaluate; skipped ingest (up to date); saved as DVC experiment `simclr-papaya`" in text
    assert "Model: `m` v2" in text
    assert "000000" not in text  # no float noise anywhere
    assert headline(params, {}).startswith("No test result")
    assert describe(params, {}, {}, None, ["ingest"], [], failed_stage="pretrain").startswith("**Failed in stage")


def test_the_link_to_a_run_is_the_server_or_the_local_ui_in_the_model_training_view(monkeypatch):
    from tasks.tracking import experiment_url, run_url

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/mlflow.db")
    view = "?workflowType=machine_learning"  # MLflow 3.17 opens the GenAI view without it
    assert run_url("abc", "7") == (f"http://127.0.0.1:5000/#/experiments/7/runs/abc{view}", True)
    assert experiment_url("7") == f"http://127.0.0.1:5000/#/experiments/7{view}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org/")
    assert run_url("abc", "7") == (f"https://mlflow.example.org/#/experiments/7/runs/abc{view}", False)


def test_per_class_table_is_wide(tmp_path):
    from ssl_lib.evaluation import per_class_table, save_per_class_png, wide_per_class_table

    names = ["zero", "one", "two"]
    truth = np.array([0, 0, 1, 2])
    tables = {"baseline": per_class_table(truth, np.array([0, 1, 1, 1]), names),
              "ssl": per_class_table(truth, np.array([0, 0, 1, 2]), names)}
    wide = wide_per_class_table(tables)
    assert list(wide.columns) == ["class", "support", "baseline_precision", "baseline_recall", "baseline_f1",
                                  "ssl_precision", "ssl_recall", "ssl_f1"]
    assert list(wide["class"]) == names and list(wide["ssl_recall"]) == [1.0, 1.0, 1.0]
    save_per_class_png(tables, tmp_path / "per_class.png", accuracies={"ssl": 1.0, "baseline": 0.5})
    assert (tmp_path / "per_class.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_in_a_log_is_whole_lines():
    from ssl_lib.progress import progress_bar

    out = io.StringIO()  # not a terminal, as a log file or a pipe
    bar = progress_bar(total=5, stream=out, desc="pretrain", disable=False, mininterval=0, maxinterval=0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("pretrain:   0%") and "5/5" in lines[-1]
    silent = io.StringIO()
    progress_bar(range(3), stream=silent, enabled=False).close()
    assert silent.getvalue() == ""


def test_the_lp_phase_reports_its_epochs_without_changing_the_weights(digits):
    import torch

    from ssl_lib.classifier import PHASES, build_classifier, train_classifier
    from tests.helpers import finetune_settings

    images, labels, mean, std = digits
    train, val = np.arange(0, 60), np.arange(60, 90)
    settings = finetune_settings(mode="full", epochs=1, batch_size=32, lr=1e-3, weight_decay=0.0, seed=0,
                                 device="cpu", head_init="prototype", lp_epochs=2, lp_lr=1e-2)
    rows: list[dict] = []
    states = []
    for callback in (None, rows.append):
        model = build_classifier("convnet_small", 1, 16, 10, mean, std, seed=0)
        model, _ = train_classifier(model, images[train], labels[train], images[val], labels[val], settings,
                                    progress=False, on_lp_epoch=callback)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert [row["epoch"] for row in rows] == [1, 2]
    # with where each epoch's time went (ssl_lib.timing): data_seconds, step_seconds, ...
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds",
                            *(f"{phase}_seconds" for phase in PHASES)}
    assert 0.0 <= rows[-1]["val_acc"] <= 1.0


def test_a_failed_run_keeps_its_own_error_when_describing_it_fails_too(monkeypatch):
    """The finally that closes a parent run must not swap the run's error for MLflow's: the first decides
    whether a retry can help (a user error is never retried) and says what went wrong. (MLflow's side, marking
    the run, is recorded here; the pipeline tests see real runs end FINISHED or FAILED.)"""
    import pytest

    from tasks import tracking

    marked: dict[str, bool] = {}
    monkeypatch.setattr(tracking, "finish_run", lambda run_id, succeeded: marked.__setitem__(run_id, succeeded))

    def broken_description() -> None:
        raise ConnectionError("tracking server went away")

    with pytest.raises(ZeroDivisionError, match="the run's own failure"):
        try:
            raise ZeroDivisionError("the run's own failure")
        finally:
            tracking.close_run("failed", False, broken_description)
    with pytest.raises(ConnectionError):  # a run that worked but cannot be described: that is the error
        tracking.close_run("succeeded", True, broken_description)
    tracking.close_run("described", True, lambda: None)
    assert marked == {"failed": False, "succeeded": False, "described": True}


def test_the_prepared_data_is_an_mlflow_dataset_named_after_its_source_and_version(tmp_path):
    import hashlib
    import json

    import yaml

    from tasks.tracking import data_summary, dataset_entity

    params = _params()
    assert dataset_entity(params, tmp_path) is None  # before ingest: nothing to log
    prepared = tmp_path / "data/prepared"
    prepared.mkdir(parents=True)
    (prepared / "meta.json").write_text(json.dumps({"source": "digits", "num_classes": 10, "shape": [8, 8, 1],
                                                    "source_version": "sha256:abc"}))
    (prepared / "lineage.json").write_text(json.dumps({"data_version": 3}))
    (prepared / "manifest.csv").write_text("index,split\n0,test\n1,labeled\n2,unlabeled\n3,unlabeled\n4,val\n")
    without_dvc = dataset_entity(params, tmp_path)
    manifest_md5 = hashlib.md5((prepared / "manifest.csv").read_bytes()).hexdigest()
    assert without_dvc.digest == manifest_md5[:8]
    lock = {"stages": {"ingest": {"outs": [{"path": "data/prepared/images.npy", "md5": "a" * 32},
                                           {"path": "data/prepared/manifest.csv", "md5": "b" * 32}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    dataset = dataset_entity(params, tmp_path)
    dvc_digest = hashlib.md5(f"{'a' * 32}:{'b' * 32}".encode()).hexdigest()  # the sslpipe.dataset_hash tag's
    assert (dataset.name, dataset.digest) == ("digits v3", dvc_digest[:8])
    profile = json.loads(dataset.profile)
    assert profile["splits"] == {"unlabeled": 2, "labeled": 1, "val": 1, "test": 1}
    assert profile["num_images"] == 5 and profile["image_shape"] == "8x8x1" and profile["digest"] == dvc_digest
    assert json.loads(dataset.source) == {"uri": "digits"}
    line = data_summary(dataset)  # what the parent run's description says of its data
    assert line == f"`digits v3` ({dvc_digest[:8]}): 5 images of 8x8x1, 1 labeled, 1 val, 1 test, 2 unlabeled"
    assert f"- Data: {line}" in describe(params, {}, {}, None, [], [], data=line)


def test_a_gain_is_worded_with_its_sign():
    from tasks.run_summary import against_baseline

    assert against_baseline(-0.033) == "3.3 points below the supervised-only baseline"
    assert against_baseline(0.0512) == "5.1 points above the supervised-only baseline"
    assert against_baseline(-0.0004) == "level with the supervised-only baseline"


def test_models_for_other_classes_or_images_are_never_compared_and_the_decision_says_why_in_words():
    from tasks.registry import data_mismatch, decide

    fashion = {"data_source": "fashion-mnist", "num_classes": "10", "class_set": "aaaa1111", "image_shape": "28x28x1"}
    digits = {"data_source": "digits", "num_classes": "10", "class_set": "bbbb2222", "image_shape": "8x8x1"}
    assert data_mismatch(digits, dict(digits)) is None
    assert data_mismatch(digits, {"data_source": "digits"}) is None  # an older version: measuring it decides
    why = data_mismatch(digits, fashion)
    assert why == "it was trained for fashion-mnist (10 classes of 28x28x1), this run for digits (10 classes of 8x8x1)"
    renamed = data_mismatch(digits, {**digits, "class_set": "cccc3333"})
    assert renamed == "it predicts other classes than this run's digits (10 classes of 8x8x1)"
    kept = decide("3", 0.9, "2", None, 0.005, why)
    assert not kept.promoted and kept.text == f"kept champion: v2 is not compared with v3: {why}"
    assert "[" not in kept.text and kept.text.count(".") == 0  # one sentence, no Python lists


def test_a_logged_model_is_named_after_what_it_is():
    from tasks.run_summary import model_name

    trained = {"method": "simclr", "backbone": "convnet", "data_source": "folder", "data": "folder shapes",
               "label_budget": "10/class", "self_train": "label_propagation+fixmatch"}
    assert model_name(trained) == "simclr-convnet-folder-shapes-10-per-class-label_propagation+fixmatch"
    assert model_name({**trained, "label_budget": "5% labeled", "self_train": "none"}) \
        == "simclr-convnet-folder-shapes-5-pct-labeled"


def test_a_run_says_what_it_inherits_from_an_uncommitted_params_yaml(tmp_path):
    import shutil

    import yaml

    from tasks.run_summary import inherited_note
    from tests.helpers import REPO, run_cmd

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert inherited_note(tmp_path, {}) is None  # not a git repository: nothing to compare with
    run_cmd(["git", "init", "-q"], tmp_path)
    run_cmd(["git", "add", "params.yaml"], tmp_path)
    run_cmd(["git", "commit", "-qm", "params"], tmp_path)
    assert inherited_note(tmp_path, {}) is None  # as committed
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["seed"] = 3  # what `sslpipe run --set seed=3` leaves behind
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    note = inherited_note(tmp_path, {"data.source": "digits"})
    assert note.startswith("params.yaml differs from the last commit, and this run keeps it: seed=3 (")
    assert "`git checkout params.yaml`" in note
    assert inherited_note(tmp_path, {"seed": 0}) is None  # this run sets it again: nothing inherited


def test_one_registered_model_per_data_source():
    from tasks.registry import champion_uri, registered_name

    assert registered_name("ssl-pipeline-classifier", "fashion-mnist") == "ssl-pipeline-classifier-fashion-mnist"
    assert registered_name("m", "folder My Shapes") == "m-folder-my-shapes"
    params = _params(data={"source": "folder", "path": "/data/shapes"})
    assert champion_uri(params) == "models:/ssl-pipeline-classifier-folder-shapes@champion"
