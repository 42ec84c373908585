"""Every SSL method runs through the real pipeline (issue #3).

* ``dvc exp run -S pretrain.method=NAME``: every method but colorization, one after another in one
  git + DVC project on digits; each runs pseudo_labels -> pretrain -> finetune -> evaluate for real
  and leaves a DVC experiment whose params name the method and whose metrics hold an SSL accuracy.
* ``sslpipe run --set pretrain.method=NAME`` (the Prefect flow, in-process against the session's
  test Prefect server): one method per family, in the same project.
* colorization: on digits (grayscale) it stops with a clear message and no traceback, both ways;
  on a small RGB ``folder`` source it runs through the whole pipeline.

Cost: each run is four stage processes that each import torch and MLflow, so the training is kept
to the minimum that still takes real optimisation steps (one pretraining epoch over 256 images, one
fine-tuning epoch); what is tested here is the wiring, not the accuracy.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssl_lib.methods import METHODS
from tests.conftest import make_project, run_cmd, use_project

pytestmark = pytest.mark.slow

VIT_METHODS = {name for name, cls in METHODS.items() if getattr(cls, "required_backbone", None) == "vit_tiny"}
RGB_METHODS = {name for name, cls in METHODS.items() if getattr(cls, "required_channels", None) == 3}
DIGITS_METHODS = sorted(set(METHODS) - RGB_METHODS)
# One per family for the Prefect path: pretext, generative (ViT), non-contrastive, contrastive.
FLOW_METHODS = ["rotation", "mae", "byol", "moco"]

# Only the wiring is under test: a few real optimisation steps per stage, nothing more.
CHEAP = {"pretrain": {"epochs": 1, "max_images": 256, "batch_size": 128},
         "finetune": {"epochs": 1, "lp_epochs": 0}}
COLOUR_ERROR = ("needs 3-channel", "digits")  # the message names the data it fits and the data it got

# DVC experiment name of each method's `dvc exp run`, filled in as they run.
EXPERIMENTS: dict[str, str] = {}


def backbone_for(method: str) -> str:
    return "vit_tiny" if method in VIT_METHODS else "convnet_small"


def test_the_lists_cover_every_method():
    assert len(METHODS) == 14
    assert RGB_METHODS == {"colorization"} and VIT_METHODS == {"mae", "autoregressive"}
    assert {METHODS[m].family for m in FLOW_METHODS} == {METHODS[m].family for m in METHODS}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    path = make_project(tmp_path_factory.mktemp("every_method") / "proj", CHEAP)
    use_project(path)
    return path


def dvc_exp_run(project: Path, method: str, *extra: str):
    # Every run names all it relies on: `-S` stays in params.yaml, so a previous run's
    # backbone or epochs would otherwise carry over.
    args = [sys.executable, "-m", "dvc", "exp", "run", "-S", f"pretrain.method={method}",
            "-S", f"pretrain.backbone={backbone_for(method)}",
            "-S", f"pretrain.epochs={CHEAP['pretrain']['epochs']}", *extra]
    return run_cmd(args, project, check=False)


@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_dvc_exp_run(project: Path, method: str):
    use_project(project)
    out = dvc_exp_run(project, method)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    for stage in ("pseudo_labels", "pretrain", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout, (stage, out.stdout)
    ran = re.search(r"Ran experiment\(s\): (\S+)", out.stdout)
    assert ran, out.stdout
    EXPERIMENTS[method] = ran.group(1)

    # `dvc exp run` applies the experiment to the workspace.
    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert (info["method"], info["backbone"]) == (method, backbone_for(method))
    history = (project / "artifacts/pretrain/history.csv").read_text().splitlines()
    assert len(history) == 1 + CHEAP["pretrain"]["epochs"]
    loss = float(history[1].split(",")[history[0].split(",").index("loss")])
    assert np.isfinite(loss), history
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0 and 0.0 <= metrics["baseline"]["accuracy"] <= 1.0
    assert 0.0 <= metrics["pretrained_encoder_knn_accuracy"] <= 1.0


def test_every_dvc_experiment_records_its_method_and_metrics(project: Path):
    missing = sorted(set(DIGITS_METHODS) - set(EXPERIMENTS))
    if missing:
        pytest.skip(f"no experiment for {missing} (their own test failed)")
    shown = json.loads(run_cmd([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = data
    for method, name in EXPERIMENTS.items():
        assert name in found, (method, name, sorted(found))
        data = found[name]
        assert data["params"]["params.yaml"]["data"]["pretrain"]["method"] == method
        metrics = data["metrics"]["results/metrics.json"]["data"]
        assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0, (method, metrics)


def _flow_runs(project: Path, method: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ssl-pipeline")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`sslpipe.parent_owner` = 'prefect' "
                                               f"and tags.`sslpipe.method` = '{method}'")
    result = []
    for parent in parents:
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        result.append((parent, {r.data.tags["sslpipe.stage"] for r in children}))
    return result


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_sslpipe_run(project: Path, method: str, prefect_server):
    from typer.testing import CliRunner

    from flows.cli import app

    use_project(project)
    # Two pretraining epochs: params no `dvc exp run` above used, so every method stage really runs here.
    epochs = CHEAP["pretrain"]["epochs"] + 1
    result = CliRunner().invoke(app, ["run", "--set", f"pretrain.method={method}",
                                      "--set", f"pretrain.backbone={backbone_for(method)}",
                                      "--set", f"pretrain.epochs={epochs}", "--root", str(project)])
    assert result.exit_code == 0, result.output
    assert "SSL gain over the baseline" in result.output

    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert (info["method"], info["backbone"], info["epochs"]) == (method, backbone_for(method), epochs)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0
    runs = _flow_runs(project, method)
    assert len(runs) == 1, runs
    parent, stages = runs[0]
    assert parent.info.status == "FINISHED" and "test_accuracy_ssl" in parent.data.metrics
    assert {"pseudo_labels", "pretrain", "finetune", "evaluate"} <= stages, stages


def test_colorization_on_digits_fails_clearly_through_dvc(project: Path):
    use_project(project)
    out = dvc_exp_run(project, "colorization")
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    assert "failed to reproduce 'pretrain'" in output and "exited with 2" in output, output
    assert all(fragment in output for fragment in COLOUR_ERROR), output
    assert "folder" in output  # ... and the source that fits
    assert "Traceback" not in output


def test_colorization_on_digits_fails_clearly_through_sslpipe(project: Path):
    from typer.testing import CliRunner

    from flows.cli import app

    use_project(project)
    params_before = (project / "params.yaml").read_text()
    result = CliRunner().invoke(app, ["run", "--set", "pretrain.method=colorization", "--root", str(project)])
    assert result.exit_code == 2, result.output
    assert all(fragment in result.output for fragment in COLOUR_ERROR), result.output
    assert "folder" in result.output and "Traceback" not in result.output
    assert (project / "params.yaml").read_text() == params_before  # rejected before anything was written


def make_rgb_shapes(root: Path, classes: int = 3, per_class: int = 40, size: int = 16) -> Path:
    """``root/<shape>/*.png``: coloured squares, disks and triangles at random places and sizes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(3)
    colours = [(220, 40, 30), (40, 200, 60), (50, 70, 230)]
    for c, shape in enumerate(["square", "disk", "triangle"][:classes]):
        (root / shape).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), (40, 40, 40))
            draw = ImageDraw.Draw(image)
            r = int(rng.integers(3, 6))
            cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
            colour = tuple(int(v * rng.uniform(0.6, 1.0)) for v in colours[c])
            box = (cx - r, cy - r, cx + r, cy + r)
            if shape == "square":
                draw.rectangle(box, fill=colour)
            elif shape == "disk":
                draw.ellipse(box, fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            image.save(root / shape / f"{shape}{i:02d}.png")
    return root


def test_colorization_runs_through_dvc_on_an_rgb_folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("colour")
    images = make_rgb_shapes(base / "shapes")
    params = {**CHEAP, "data": {"source": "folder", "path": str(images)}}
    project = make_project(base / "proj", params)
    use_project(project)
    out = dvc_exp_run(project, "colorization")
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert "Running stage 'ingest'" in out.stdout and "Running stage 'evaluate'" in out.stdout
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["shape"][-1] == 3
    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert info["method"] == "colorization" and info["in_channels"] == 3
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0
    assert yaml.safe_load((project / "params.yaml").read_text())["pretrain"]["method"] == "colorization"
