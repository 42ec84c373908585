"""Every SSL method runs through the real pipeline (issue #3).

* ``dvc exp run -S pretrain.method=NAME pretrain``: every method but colorization, one after another in
  one git + DVC project on digits. DVC runs the two stages that depend on the method (pseudo_labels,
  pretrain) for real and saves an experiment whose params name the method; the encoder it writes then
  loads into the classifier exactly as the finetune stage loads it.
* ``sslpipe run --set pretrain.method=NAME`` (the Prefect flow, in-process against the session's test
  Prefect server), every method but colorization, on a smaller pretraining pool than the DVC runs
  (``pretrain.max_images``), so DVC's run cache has nothing for it: the flow runs pseudo_labels,
  pretrain, finetune and evaluate for real, so each method goes from pretext targets to test accuracy,
  and the flow saves that as a DVC experiment.
* colorization: on digits (grayscale) it stops with a clear message and no traceback, both ways; on a
  small RGB ``folder`` source it runs through the whole pipeline with `dvc exp run`, then `sslpipe run`.

Cost: every stage is a fresh process that imports torch, MLflow and Prefect (about 10 CPU-seconds each
before any work; finetune also exports and registers a model), so a full 4-stage run per method costs
about a minute even with a single epoch: this is the suite's longest module.
SSLPIPE_FULL_METHOD_RUNS=1 makes the `dvc exp run`s whole pipelines too (no target). Training is the
minimum that still takes real optimisation steps: what is tested is the wiring, not the accuracy.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssl_lib.methods import METHODS
from tests.conftest import make_project, run_cmd, use_project

pytestmark = pytest.mark.slow

VIT_METHODS = {name for name, cls in METHODS.items() if cls.required_backbone == "vit_tiny"}
RGB_METHODS = {name for name, cls in METHODS.items() if cls.required_channels == 3}
DIGITS_METHODS = sorted(set(METHODS) - RGB_METHODS)
FULL_RUNS = os.environ.get("SSLPIPE_FULL_METHOD_RUNS", "") not in ("", "0")
METHOD_STAGES = ("pseudo_labels", "pretrain")

# Only the wiring is under test: a few real optimisation steps per stage, nothing more.
CHEAP = {"pretrain": {"epochs": 1, "max_images": 256, "batch_size": 128},
         "finetune": {"epochs": 1, "lp_epochs": 0}}
# The flow's pool differs from the DVC runs' so that it pretrains each method itself (no run-cache hit).
FLOW_MAX_IMAGES = 384
COLOUR_ERROR = ("needs 3-channel", "digits")  # the message names the data it fits and the data it got

# DVC experiment name of each method's `dvc exp run`, filled in as they run.
EXPERIMENTS: dict[str, str] = {}


def backbone_for(method: str) -> str:
    return "vit_tiny" if method in VIT_METHODS else "convnet_small"


def test_the_lists_cover_every_method():
    assert len(METHODS) == 14
    assert RGB_METHODS == {"colorization"} and VIT_METHODS == {"mae", "autoregressive"}
    assert set(DIGITS_METHODS) | RGB_METHODS == set(METHODS)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    path = make_project(tmp_path_factory.mktemp("every_method") / "proj", CHEAP)
    use_project(path)
    return path


def dvc_exp_run(project: Path, method: str, *targets: str):
    # Every run names all the pretrain params it relies on: `-S` stays in params.yaml, so a previous
    # run's backbone or epochs would otherwise carry over.
    args = [sys.executable, "-m", "dvc", "exp", "run", "-S", f"pretrain.method={method}",
            "-S", f"pretrain.backbone={backbone_for(method)}",
            "-S", f"pretrain.epochs={CHEAP['pretrain']['epochs']}",
            "-S", f"pretrain.max_images={CHEAP['pretrain']['max_images']}", *targets]
    return run_cmd(args, project, check=False)


def check_encoder(project: Path, method: str) -> None:
    """encoder.json names the method, the loss is finite, and encoder.pt loads into the classifier the
    way the finetune stage loads it (strict state_dict), giving finite logits."""
    import torch

    from ssl_lib.classifier import build_classifier

    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert (info["method"], info["backbone"]) == (method, backbone_for(method))
    history = (project / "artifacts/pretrain/history.csv").read_text().splitlines()
    assert len(history) == 1 + CHEAP["pretrain"]["epochs"]
    loss = float(history[1].split(",")[history[0].split(",").index("loss")])
    assert np.isfinite(loss), history
    state = torch.load(project / "artifacts/pretrain/encoder.pt", weights_only=True)
    model = build_classifier(info["backbone"], info["in_channels"], info["image_size"], 10, info["mean"],
                             info["std"], encoder_state=state).eval()
    images = np.load(project / "data/prepared/images.npy")[:8]
    with torch.no_grad():
        logits = model(torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_dvc_exp_run(project: Path, method: str):
    use_project(project)
    out = dvc_exp_run(project, method, *([] if FULL_RUNS else ["pretrain"]))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    expected = METHOD_STAGES + (("finetune", "evaluate") if FULL_RUNS else ())
    for stage in expected:
        assert f"Running stage '{stage}'" in out.stdout, (stage, out.stdout)
    ran = re.search(r"Ran experiment\(s\): (\S+)", out.stdout)
    assert ran, out.stdout
    EXPERIMENTS[method] = ran.group(1)
    check_encoder(project, method)  # `dvc exp run` applied the experiment to the workspace
    if FULL_RUNS:
        metrics = json.loads((project / "results/metrics.json").read_text())
        assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0 and 0.0 <= metrics["baseline"]["accuracy"] <= 1.0


def _experiments(project: Path) -> dict[str, dict]:
    shown = json.loads(run_cmd([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout)
    return {exp["name"]: exp["revs"][0]["data"] for commit in shown for exp in commit.get("experiments") or []}


def test_every_dvc_experiment_records_its_method(project: Path):
    missing = sorted(set(DIGITS_METHODS) - set(EXPERIMENTS))
    if missing:
        pytest.skip(f"no experiment for {missing} (their own test failed)")
    found = _experiments(project)
    for method, name in EXPERIMENTS.items():
        assert name in found, (method, name, sorted(found))
        params = found[name]["params"]["params.yaml"]["data"]["pretrain"]
        assert (params["method"], params["backbone"]) == (method, backbone_for(method))
        if FULL_RUNS:
            metrics = found[name]["metrics"]["results/metrics.json"]["data"]
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


FLOW_EXPERIMENTS: dict[str, str] = {}  # method -> the DVC experiment its flow run saved


def sslpipe_run(project: Path, *sets: str):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["run", *(arg for item in sets for arg in ("--set", item)), "--root", str(project)]
    # Wide enough that rich does not wrap the summary lines.
    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_sslpipe_run(project: Path, method: str, prefect_server):
    use_project(project)
    result = sslpipe_run(project, f"pretrain.method={method}", f"pretrain.backbone={backbone_for(method)}",
                         f"pretrain.epochs={CHEAP['pretrain']['epochs']}", f"pretrain.max_images={FLOW_MAX_IMAGES}")
    assert result.exit_code == 0, result.output
    assert "gain over the baseline" in result.output
    saved = re.search(r"DVC experiment: (\S+)", result.output)
    assert saved and saved.group(1) != "None", result.output
    FLOW_EXPERIMENTS[method] = saved.group(1)

    check_encoder(project, method)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0 and 0.0 <= metrics["baseline"]["accuracy"] <= 1.0
    runs = _flow_runs(project, method)
    assert len(runs) == 1, runs
    parent, stages = runs[0]
    # Run or found up to date, the parent carries the results it stands for.
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy_ssl"] == metrics["ssl"]["accuracy"]
    # The flow ran every stage that depends on the method: no DVC run made this pool before.
    assert set(METHOD_STAGES) | {"finetune", "evaluate"} <= stages, stages


def test_flow_runs_are_dvc_experiments_with_metrics(project: Path):
    if not FLOW_EXPERIMENTS:
        pytest.skip("no flow run succeeded")
    found = _experiments(project)
    for method, name in FLOW_EXPERIMENTS.items():
        assert name in found, (method, name, sorted(found))
        assert found[name]["params"]["params.yaml"]["data"]["pretrain"]["method"] == method
        metrics = found[name]["metrics"]["results/metrics.json"]["data"]
        assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0, (method, metrics)


def test_colorization_on_digits_fails_clearly_through_dvc(project: Path):
    use_project(project)
    out = dvc_exp_run(project, "colorization")
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    # Rejected by the first stage that sees the images, before any pseudo label or training step.
    assert "failed to reproduce 'pseudo_labels'" in output and "exited with 2" in output, output
    assert all(fragment in output for fragment in COLOUR_ERROR), output
    assert "folder" in output  # ... and the source that fits
    assert "Traceback" not in output


def test_colorization_on_digits_fails_clearly_through_sslpipe(project: Path):
    use_project(project)
    params_before = (project / "params.yaml").read_text()
    result = sslpipe_run(project, "pretrain.method=colorization")
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


@pytest.fixture(scope="module")
def colour_project(tmp_path_factory) -> Path:
    """A project on 120 coloured 16x16 shapes (3 classes): data the colorization method fits."""
    base = tmp_path_factory.mktemp("colour")
    images = make_rgb_shapes(base / "shapes")
    return make_project(base / "proj", {**CHEAP, "data": {"source": "folder", "path": str(images)}})


def test_colorization_runs_through_dvc_on_an_rgb_folder(colour_project: Path):
    project = colour_project
    use_project(project)
    out = dvc_exp_run(project, "colorization")  # the whole pipeline, ingest to evaluate
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    for stage in ("ingest", "pseudo_labels", "pretrain", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout, (stage, out.stdout)
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["shape"][-1] == 3
    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert (info["method"], info["in_channels"]) == ("colorization", 3)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0
    assert yaml.safe_load((project / "params.yaml").read_text())["pretrain"]["method"] == "colorization"


def test_colorization_runs_through_sslpipe_on_an_rgb_folder(colour_project: Path, prefect_server):
    """The flow's up-front check accepts colour data; DVC finds the run above up to date."""
    project = colour_project
    use_project(project)
    result = sslpipe_run(project, "pretrain.method=colorization", "pretrain.backbone=convnet_small",
                         f"pretrain.epochs={CHEAP['pretrain']['epochs']}")
    assert result.exit_code == 0, result.output
    assert "gain over the baseline" in result.output
    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert (info["method"], info["in_channels"]) == ("colorization", 3)
    accuracy = json.loads((project / "results/metrics.json").read_text())["ssl"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    # Nothing ran, yet the flow's MLflow parent run carries the metrics it stands for.
    (parent, stages), = _flow_runs(project, "colorization")
    assert not stages and parent.data.metrics["test_accuracy_ssl"] == accuracy
