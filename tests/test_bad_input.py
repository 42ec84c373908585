"""User mistakes get one clear message naming the fix, exit code 2, no traceback, and no partial outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from ssl_lib.config import ConfigError, load_params
from tasks.params_file import apply_param_overrides
from tests.helpers import REPO, make_project, run_stage_here, use_project

runner = CliRunner()


@pytest.mark.parametrize("override, expected", [
    ("pretrain.epoch=3", ["pretrain.epoch", "unknown key"]),
    ("pretrain.epochs=many", ["pretrain.epochs", "integer"]),
    ("pretrain.epochs=true", ["pretrain.epochs", "valid integer (got True)"]),  # not 1 epoch (issue #28)
    ("pretrain.method=sift", ["pretrain.method", "unknown method 'sift'", "rotation", "simclr"]),
    ("pretrain.backbone=vgg", ["pretrain.backbone", "convnet"]),
    ("pretrain.options={bogus: {x: 1}}", ["bogus", "allowed", "simclr"]),
    ("pretrain.options={simclr: {temprature: 0.1}}", ["temprature", "allowed", "temperature"]),
    ("pretrain.options.simclr.temperature=-1", ["pretrain.options.simclr.temperature", "greater than 0"]),
    ("data.source=cifar", ["data.source", "fashion-mnist", "digits", "folder"]),
    ("data.label_fraction=0.1", ["data.labels_per_class", "data.label_fraction"]),
    ("finetune.mode=partial", ["finetune.mode", "full", "linear"]),
    ("data.labels_per_class=500", ["data.labels_per_class", "data.val_per_class"]),  # impossible budget
    ("data.source=folder", ["data.path"]),
    ("pretrain.method=mae", ["pretrain.backbone", "vit_tiny"]),
    ("pretrain.method=colorization", ["3-channel", "digits"]),
    ("self_train.threshold=1.5", ["self_train.threshold", "less than or equal to 1"]),
    ("self_train.threshold=0", ["self_train.threshold", "greater than 0"]),
    ("self_train.rounds=-1", ["self_train.rounds"]),
    ("self_train.method=mixmatch", ["self_train.method", "label_propagation", "fixmatch"]),
    ("self_train.images_seen=0", ["self_train.images_seen", "greater than or equal to 1"]),
])
def test_run_rejects_bad_params_before_any_compute(project: Path, override: str, expected: list[str]):
    params_before = (project / "params.yaml").read_text()
    result = runner.invoke(app, ["run", "--set", override, "--root", str(project)])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output, (fragment, result.output)
    assert "Traceback" not in result.output
    # Nothing was started or written.
    assert (project / "params.yaml").read_text() == params_before
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()


def test_validate_accepts_good_overrides(project: Path):
    result = runner.invoke(app, ["validate", "--set", "pretrain.epochs=3", "--root", str(project)])
    assert result.exit_code == 0, result.output
    params_json, plan = result.output.split("\nplan: ", 1)
    assert json.loads(params_json)["pretrain"]["epochs"] == 3
    # The plan: the data's shape, then each training stage's steps and minutes from the probe.
    assert "8x8x1 in 10 classes" in plan, plan
    pretrain_line = next(line for line in plan.splitlines() if line.strip().startswith("pretrain"))
    assert "3 passes" in pretrain_line and "min" in pretrain_line, plan


def test_validate_rejects_a_mistyped_method_option_in_one_line(project: Path):
    result = runner.invoke(app, ["validate", "--set", "pretrain.options.simclr.temperature=hot",
                                 "--root", str(project)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    problems = [line for line in result.output.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1, result.output
    assert problems[0].startswith("  - pretrain.options.simclr.temperature: Input should be a valid number")


def test_unknown_stage_is_named(project: Path):
    result = runner.invoke(app, ["stage", "train", "--root", str(project)])
    assert result.exit_code == 2
    assert "ingest, pseudo_labels, pretrain, finetune" in result.output


def test_stage_cli_reports_broken_params_without_traceback(project: Path, monkeypatch, capsys):
    (project / "params.yaml").write_text("seed: 0\npretrain:\n  methd: simclr\n")
    with pytest.raises(SystemExit) as info:  # anything but a user error would leave as its own exception
        run_stage_here("ingest", project, monkeypatch)
    assert info.value.code == 2
    assert "pretrain.methd" in capsys.readouterr().err


def test_stage_before_its_inputs_exist_names_the_fix(project: Path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as info:
        run_stage_here("pretrain", project, monkeypatch)
    assert info.value.code == 2
    assert "dvc repro" in capsys.readouterr().err
    assert not (project / "artifacts/pretrain/encoder.pt").exists()


def test_corrupt_image_in_folder_source_is_reported_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from PIL import Image

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (images / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(images / cls / f"{i}.png")
    (images / "dog" / "broken.png").write_bytes(b"\x89PNG not really an image")
    project = make_project(tmp_path / "proj", {"data": {"source": "folder", "path": str(images),
                                                        "labels_per_class": 2, "val_per_class": 1}})
    use_project(project, monkeypatch)
    result = runner.invoke(app, ["stage", "ingest", "--root", str(project)])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image" in result.output and "broken.png" in result.output
    report = json.loads((project / "data/prepared/report.json").read_text())
    assert report["num_skipped"] == 1 and report["skipped"][0]["path"].endswith("broken.png")
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["num_images"] == 24


def test_overrides_keep_params_comments_and_validate_first(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    params = apply_param_overrides(path, {"pretrain.method": "rotation", "finetune.epochs": 7})
    assert params.pretrain.method == "rotation"
    text = path.read_text()
    assert "# fashion-mnist | digits | folder" in text  # comments survive
    before, after = (REPO / "params.yaml").read_text().splitlines(), text.splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=False) if a != b]
    assert len(before) == len(after) and len(changed) == 2, changed  # only the overridden lines, nulls kept
    assert load_params(path).finetune.epochs == 7
    with pytest.raises(ConfigError, match="pretrain.method"):
        apply_param_overrides(path, {"pretrain.method": "nope"})
    assert yaml.safe_load(path.read_text())["pretrain"]["method"] == "rotation"


# ---------------------------------------------------------------- which errors count as the user's (issue #11)

def test_label_budget_and_method_requirements_have_their_own_classes():
    from ssl_lib.config import parse_params
    from ssl_lib.errors import LabelBudgetError, MethodRequirementError
    from tasks.preflight import check_label_budget

    with pytest.raises(LabelBudgetError, match="data.labels_per_class"):
        check_label_budget(parse_params({"data": {"source": "digits", "labels_per_class": 500}}))
    with pytest.raises(MethodRequirementError, match="3-channel"):
        check_label_budget(parse_params({"data": {"source": "digits"}, "pretrain": {"method": "colorization"}}))


@pytest.mark.parametrize("device, expected", [("tpu", "unknown device 'tpu'"), ("", "unknown device ''"),
                                              ("meta", "unknown device 'meta'")])
def test_unknown_device_is_a_config_error(device: str, expected: str):
    from ssl_lib.device import select_device

    with pytest.raises(ConfigError, match=expected) as info:
        select_device(device)
    assert "pretrain.device" in str(info.value)


def test_unavailable_accelerator_is_a_config_error():
    import torch

    from ssl_lib.acceleration import resolve_acceleration
    from ssl_lib.device import select_device

    with pytest.raises(ConfigError, match="pretrain.precision"):
        resolve_acceleration(torch.device("cpu"), "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            select_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("loader, stage", [("tasks.pretrained:load_encoder_info", "pretrain"),
                                           ("tasks.pseudo_targets:load_pseudo_labels", "pseudo_labels")])
def test_missing_upstream_output_is_a_data_error(tmp_path: Path, monkeypatch, loader: str, stage: str):
    import importlib

    from ssl_lib.errors import DataError

    module, name = loader.split(":")
    monkeypatch.chdir(tmp_path)  # stages read their inputs relative to the project root
    with pytest.raises(DataError, match=f"dvc repro {stage}"):
        getattr(importlib.import_module(module), name)()


@pytest.mark.parametrize("uri, expected", [("models:/", "malformed"), ("models:/a/b/c", "malformed")])
def test_malformed_model_uri_is_a_data_error(uri: str, expected: str):
    from ssl_lib.errors import DataError
    from tasks.predict import load_model

    with pytest.raises(DataError, match=expected):
        load_model(uri)


def test_predict_with_a_missing_model_is_one_line(tmp_path: Path):
    (tmp_path / "images").mkdir()
    result = runner.invoke(app, ["predict", str(tmp_path / "images"), "--model", str(tmp_path / "no-model"),
                                 "--output", str(tmp_path / "p.csv"), "--root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "cannot load model" in result.output and "models:/NAME@champion" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p.csv").exists()


def test_a_bug_in_a_command_is_not_shown_as_a_user_error(project: Path, monkeypatch):
    import tasks.preflight

    def buggy(params, root=None):
        raise ValueError("list index out of range, say")

    monkeypatch.setattr(tasks.preflight, "check_label_budget", buggy)
    result = runner.invoke(app, ["validate", "--root", str(project)])
    assert result.exit_code != 2
    assert isinstance(result.exception, ValueError) and "error: " not in result.output


@pytest.mark.parametrize("user_error, exit_code", [(True, 2), (False, 1)])
def test_stage_command_exit_code_says_whose_the_failure_is(project: Path, monkeypatch, user_error: bool,
                                                            exit_code: int):
    import flows.stages

    def failing(stage, root, env_extra=None, force=False, echo=print):
        if user_error:
            raise flows.stages.StageUserError(stage, 1, "...", "DataError", "data/prepared is missing")
        raise flows.stages.StageFailed(stage, 1, "Traceback (most recent call last):\n  ...\nZeroDivisionError")

    monkeypatch.setattr(flows.stages, "run_dvc_stage", failing)
    result = runner.invoke(app, ["stage", "finetune", "--root", str(project)])
    assert result.exit_code == exit_code, result.output
    assert ("data/prepared is missing" in result.output) == user_error
    assert ("ZeroDivisionError" in result.output) != user_error  # a crash shows the stage's own traceback


def test_sweep_point_reports_the_stage_user_error(tmp_path: Path):
    from flows.stages import StageUserError
    from flows.sweep import _point_failure

    report = tmp_path / "report.json"
    assert type(_point_failure("p", 1, "boom", report)) is RuntimeError  # no report: not the user's
    report.write_text(json.dumps({"stage": "pseudo_labels", "user_error": {"kind": "MethodRequirementError",
                                                                             "message": "needs 3-channel images"}}))
    err = _point_failure("p", 1, "tail", report)
    assert isinstance(err, StageUserError) and str(err) == "pseudo_labels: needs 3-channel images"


def test_a_stage_run_by_another_python_names_the_virtual_environment(tmp_path: Path):
    """dvc repro outside the venv runs `python -m tasks.<stage>` with an interpreter that lacks the project's
    libraries: one line naming the fix, exit 2, no traceback."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = ("import importlib.util, runpy, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else real(name, *a); "
            "sys.argv = ['tasks.fingerprint']; runpy.run_module('tasks.fingerprint', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 2, result.stderr
    assert "has no torch" in result.stderr and "source .venv/bin/activate" in result.stderr
    assert "Traceback" not in result.stderr
