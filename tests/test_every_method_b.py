"""Every SSL method through its stages (see tests/every_method.py): the second half of the digits methods, and
colorization through ``dvc exp run`` (the whole pipeline) and ``sslpipe run`` on a small RGB ``folder`` source."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.every_method import (
    CHEAP,
    DIGITS_METHODS,
    dvc_exp_run,
    flow_runs,
    method_half_tests,
    sslpipe_run,
)
from tests.helpers import make_project, use_project

pytestmark = pytest.mark.slow

# test_every_method_a.py runs DIGITS_METHODS[0::2]
project, test_method_runs_through_its_stages, test_every_experiment_records_its_method = \
    method_half_tests(DIGITS_METHODS[1::2], "every_method_b")


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
