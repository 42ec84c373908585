"""Every SSL method through the pipeline's stages (issue #3): the helpers of ``tests/test_every_method.py``.

Each method, in one git + DVC project on digits, runs every stage it reaches: its params written into params.yaml
as ``dvc exp run -S`` writes them, then pseudo_labels, pretrain, finetune, self_train and evaluate, each run as DVC
runs it (``python -m tasks.<stage>`` in the project) but in the test's own process (``tests.helpers.run_stage_here``).
The encoder it writes loads into the classifier exactly as the finetune stage loads it, and each method goes from
pretext targets to test accuracy, with every stage's MLflow run naming the method.

The method reaches the stages through params.yaml alone, so the commands a user types wire every method alike;
``THROUGH_COMMANDS`` methods take them for real, in their own processes:

* ``dvc exp run -S pretrain.method=NAME ... pretrain``: DVC runs the two stages that depend on the method
  (pseudo_labels, pretrain) and saves an experiment whose params name the method;
* then ``sslpipe run --set pretrain.method=NAME ...`` with the same params (the Prefect flow, in-process, against
  the session's test Prefect server): DVC finds the method's pretraining up to date (the experiment just made it)
  and the flow runs finetune, self_train and evaluate on that encoder, and saves that as a DVC experiment.

Each stage process DVC starts imports torch and MLflow anew, seconds before any work, which is why the other methods
run their stages in-process. ``SSLPIPE_FULL_METHOD_RUNS=1`` sends every method through both commands, the
``dvc exp run``\\ s as whole pipelines (no target); the flow then finds everything up to date. Training is the minimum
that still takes real optimisation steps: what is tested is the wiring, not the accuracy.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_lib.methods import METHODS
from tests.helpers import run_cmd, run_stage_here, use_project

VIT_METHODS = {name for name, cls in METHODS.items() if cls.required_backbone == "vit_tiny"}
RGB_METHODS = {name for name, cls in METHODS.items() if cls.required_channels == 3}
DIGITS_METHODS = sorted(set(METHODS) - RGB_METHODS)
FULL_RUNS = os.environ.get("SSLPIPE_FULL_METHOD_RUNS", "") not in ("", "0")
METHOD_STAGES = ("pseudo_labels", "pretrain")
DOWNSTREAM_STAGES = ("finetune", "self_train", "evaluate")
# The digits method that takes both commands for real: params.yaml's default.
THROUGH_COMMANDS = ("simclr",)

# Only the wiring is under test: a few real optimisation steps per stage, nothing more.
CHEAP = {"pretrain": {"epochs": 1, "max_images": 256, "batch_size": 128},
         "finetune": {"epochs": 1, "lp_epochs": 0},
         "self_train": {"rounds": 1}}
COLOUR_ERROR = ("needs 3-channel", "digits")  # the message names the data it fits and the data it got


def backbone_for(method: str) -> str:
    return "vit_tiny" if method in VIT_METHODS else "convnet_small"


def method_overrides(method: str) -> list[str]:
    """Every pretrain param a run relies on: ``dvc exp run -S`` stays in params.yaml, so a previous run's
    backbone or epochs would otherwise carry over."""
    return [f"pretrain.method={method}", f"pretrain.backbone={backbone_for(method)}",
            f"pretrain.epochs={CHEAP['pretrain']['epochs']}", f"pretrain.max_images={CHEAP['pretrain']['max_images']}"]


def dvc_exp_run(project: Path, method: str, *targets: str):
    args = [sys.executable, "-m", "dvc", "exp", "run"]
    for override in method_overrides(method):
        args += ["-S", override]
    return run_cmd([*args, *targets], project, check=False)


def sslpipe_run(project: Path, *sets: str):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["run", *(arg for item in sets for arg in ("--set", item)), "--root", str(project)]
    # Wide enough that rich does not wrap the summary lines.
    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


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


def experiments(project: Path) -> dict[str, dict]:
    """``dvc exp show``: each experiment's name and its data (params, metrics)."""
    shown = json.loads(run_cmd([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout)
    return {exp["name"]: exp["revs"][0]["data"] for commit in shown for exp in commit.get("experiments") or []}


def flow_runs(project: Path, method: str) -> list:
    """The flow's MLflow parent runs for ``method``, each with the set of stages that ran under it."""
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


def run_method_here(project: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The method's params into params.yaml (as ``dvc exp run -S`` writes them), then every stage from pseudo_labels
    to evaluate in this process, checking the encoder, the metrics and each stage's MLflow run."""
    from mlflow import MlflowClient

    from ssl_lib.config import parse_override
    from tasks.params_file import apply_param_overrides

    use_project(project, monkeypatch)
    apply_param_overrides(project / "params.yaml", dict(parse_override(text) for text in method_overrides(method)))
    (project / "results/metrics.json").unlink(missing_ok=True)  # so that the one read below is this method's
    for stage in METHOD_STAGES + DOWNSTREAM_STAGES:
        run_stage_here(stage, project, monkeypatch)
    check_encoder(project, method)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0 and 0.0 <= metrics["baseline"]["accuracy"] <= 1.0
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ssl-pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`sslpipe.method` = '{method}'")
    stages = {r.data.tags["sslpipe.stage"]: r.info.status for r in runs if "sslpipe.stage" in r.data.tags}
    assert stages == {stage: "FINISHED" for stage in METHOD_STAGES + DOWNSTREAM_STAGES}, stages


def run_method_both_ways(project: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``dvc exp run`` then ``sslpipe run`` for ``method`` (see the module docstring), checking each; returns
    the DVC experiment each of them saved."""
    use_project(project, monkeypatch)
    out = dvc_exp_run(project, method, *([] if FULL_RUNS else ["pretrain"]))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    for stage in METHOD_STAGES + (DOWNSTREAM_STAGES if FULL_RUNS else ()):
        assert f"Running stage '{stage}'" in out.stdout, (stage, out.stdout)
    ran = re.search(r"Ran experiment\(s\): (\S+)", out.stdout)
    assert ran, out.stdout
    check_encoder(project, method)  # `dvc exp run` applied the experiment to the workspace

    result = sslpipe_run(project, *method_overrides(method))
    assert result.exit_code == 0, result.output
    assert re.search(r"final model: [\d.]+ points (above|below) the supervised-only baseline|final model: level with",
                     result.output), result.output
    saved = re.search(r"DVC experiment: (\S+)", result.output)
    assert saved and saved.group(1) != "None", result.output
    check_encoder(project, method)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0 and 0.0 <= metrics["baseline"]["accuracy"] <= 1.0
    runs = flow_runs(project, method)
    assert len(runs) == 1, runs
    parent, stages = runs[0]
    # Run or found up to date, the parent carries the results it stands for.
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy_ssl"] == metrics["ssl"]["accuracy"]
    # DVC found the method's pretraining up to date (its experiment made it just before) and ran the rest.
    assert not stages & set(METHOD_STAGES), stages
    assert stages == (set() if FULL_RUNS else set(DOWNSTREAM_STAGES)), stages
    return {"dvc exp run": ran.group(1), "sslpipe run": saved.group(1)}


def check_experiments_record_their_method(project: Path, saved: dict[str, dict[str, str]]) -> None:
    """Every saved experiment names its method in its params; the flow's ones carry the metrics too."""
    found = experiments(project)
    for method, names in saved.items():
        for how, name in names.items():
            assert name in found, (method, how, name, sorted(found))
            params = found[name]["params"]["params.yaml"]["data"]["pretrain"]
            assert (params["method"], params["backbone"]) == (method, backbone_for(method)), (how, params)
            if how == "sslpipe run" or FULL_RUNS:
                accuracy = found[name]["metrics"]["results/metrics.json"]["data"]["ssl"]["accuracy"]
                assert 0.0 <= accuracy <= 1.0, (method, how, accuracy)
