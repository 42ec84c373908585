"""Every SSL method through its stages (see tests/every_method.py): every digits method in this process, simclr also
through ``dvc exp run`` and ``sslpipe run``; colorization refused on digits, both ways, with a clear message and no
traceback; and colorization through ``dvc exp run`` (the whole pipeline) and ``sslpipe run`` on a small RGB
``folder`` source."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssl_lib.methods import METHODS
from tests.every_method import (
    CHEAP,
    COLOUR_ERROR,
    DIGITS_METHODS,
    FULL_RUNS,
    RGB_METHODS,
    THROUGH_COMMANDS,
    VIT_METHODS,
    check_experiments_record_their_method,
    dvc_exp_run,
    flow_runs,
    run_method_both_ways,
    run_method_here,
    sslpipe_run,
)
from tests.helpers import make_project, run_stage_here, use_project

pytestmark = pytest.mark.slow

THROUGH = set(DIGITS_METHODS) if FULL_RUNS else set(THROUGH_COMMANDS)  # the methods that take both commands
_saved: dict[str, dict[str, str]] = {}  # method -> the DVC experiment each command saved


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Path]:
    """One digits project for every method, its data prepared once (every method's stages read the same images)."""
    path = make_project(tmp_path_factory.mktemp("every_method") / "proj", CHEAP)
    with pytest.MonkeyPatch.context() as patch:  # the module's tests run on it; undone after the last
        use_project(path, patch)
        with pytest.MonkeyPatch.context() as here:
            run_stage_here("ingest", path, here)
        yield path


@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_method_runs_through_its_stages(project: Path, method: str, prefect_server,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if method in THROUGH:
        _saved[method] = run_method_both_ways(project, method, monkeypatch)
    else:
        run_method_here(project, method, monkeypatch)


def test_every_experiment_records_its_method(project: Path) -> None:
    if set(_saved) != THROUGH:
        pytest.skip(f"no experiments for {sorted(THROUGH - set(_saved))} (their own test failed)")
    check_experiments_record_their_method(project, _saved)


def test_the_lists_cover_every_method():
    assert len(METHODS) == 14
    assert RGB_METHODS == {"colorization"} and VIT_METHODS == {"mae", "autoregressive"}
    assert set(DIGITS_METHODS) | RGB_METHODS == set(METHODS)
    assert set(THROUGH_COMMANDS) <= set(DIGITS_METHODS)


def test_colorization_on_digits_fails_clearly_through_dvc(project: Path, monkeypatch: pytest.MonkeyPatch):
    use_project(project, monkeypatch)
    out = dvc_exp_run(project, "colorization")
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    # Rejected by the first stage that sees the images, before any pseudo label or training step.
    assert "failed to reproduce 'pseudo_labels'" in output and "exited with 2" in output, output
    assert all(fragment in output for fragment in COLOUR_ERROR), output
    assert "folder" in output  # ... and the source that fits
    assert "Traceback" not in output


def test_colorization_on_digits_fails_clearly_through_sslpipe(project: Path, monkeypatch: pytest.MonkeyPatch):
    use_project(project, monkeypatch)
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


def test_colorization_runs_through_dvc_on_an_rgb_folder(colour_project: Path, monkeypatch: pytest.MonkeyPatch):
    project = colour_project
    use_project(project, monkeypatch)
    out = dvc_exp_run(project, "colorization")  # the whole pipeline, ingest to evaluate
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    for stage in ("ingest", "pseudo_labels", "pretrain", "finetune", "self_train", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout, (stage, out.stdout)
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["shape"][-1] == 3
    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert (info["method"], info["in_channels"]) == ("colorization", 3)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0.0 <= metrics["ssl"]["accuracy"] <= 1.0
    assert yaml.safe_load((project / "params.yaml").read_text())["pretrain"]["method"] == "colorization"


def test_colorization_runs_through_sslpipe_on_an_rgb_folder(colour_project: Path, prefect_server,
                                                            monkeypatch: pytest.MonkeyPatch):
    """The flow's up-front check accepts colour data; DVC finds the run above up to date."""
    project = colour_project
    use_project(project, monkeypatch)
    result = sslpipe_run(project, "pretrain.method=colorization", "pretrain.backbone=convnet_small",
                         f"pretrain.epochs={CHEAP['pretrain']['epochs']}")
    assert result.exit_code == 0, result.output
    assert re.search(r"final model: [\d.]+ points (above|below) the supervised-only baseline|final model: level with",
                     result.output), result.output
    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert (info["method"], info["in_channels"]) == ("colorization", 3)
    accuracy = json.loads((project / "results/metrics.json").read_text())["ssl"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    # Nothing ran, yet the flow's MLflow parent run carries the metrics it stands for.
    (parent, stages), = flow_runs(project, "colorization")
    assert not stages and parent.data.metrics["test_accuracy_ssl"] == accuracy
