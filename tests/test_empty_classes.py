"""Every class has images, or the run stops before any compute (issue #28): an empty class folder, a class whose
files are all unusable, a folder link, a folder named like an image and a one-class source each get one line
naming the class and the fix, exit 2."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from ssl_lib.config import parse_params
from ssl_lib.errors import DataError
from tests.helpers import make_project, use_project

runner = CliRunner()


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 6) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", 100 * c + i)
    return root


def _params(folder: Path):
    return parse_params({"data": {"source": "folder", "path": str(folder), "labels_per_class": 1,
                                  "val_per_class": 1, "test_fraction": 0.2}})


def _truncated(path: Path) -> None:
    """A PNG whose header reads (listing accepts it) but whose pixels do not (ingest drops it)."""
    _png(path, 7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break(folder: Path, problem: str) -> None:
    if problem == "empty":
        (folder / "eel").mkdir()
    elif problem == "corrupt":
        for i in range(3):
            (folder / "eel").mkdir(exist_ok=True)
            (folder / "eel" / f"{i}.png").write_bytes(b"\x89PNG not an image")
    elif problem == "symlink":
        os.symlink(".", folder / "self")  # a link back to the folder itself: a loop if it were followed
    elif problem == "image-named":
        (folder / "y.png").mkdir()
    elif problem == "one-class":
        os.rename(folder / "dog", folder.parent / "dog-elsewhere")


@pytest.mark.parametrize("problem, expected", [
    ("empty", ["class 'eel'", "holds no image file", "data.path/eel"]),
    ("corrupt", ["class 'eel'", "all 3 of its files are unusable", "eel/0.png"]),
    ("symlink", ["class 'self'", "symbolic link", "real folder"]),
    ("image-named", ["class 'y.png'", "named like an image file", "rename"]),
    ("one-class", ["one class ('cat')", "at least two"]),
])
def test_preflight_stops_on_a_class_without_images(tmp_path: Path, problem: str, expected: list[str]):
    from tasks.preflight import check_label_budget

    folder = _folder(tmp_path / "images")
    check_label_budget(_params(folder))  # the healthy folder passes
    _break(folder, problem)
    with pytest.raises(DataError) as info:
        check_label_budget(_params(folder))
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_validate_and_run_say_it_in_one_line_before_any_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = _folder(tmp_path / "images")
    (folder / "eel").mkdir()
    project = make_project(tmp_path / "proj", {"data": {"source": "folder", "path": str(folder),
                                                        "labels_per_class": 1, "val_per_class": 1}})
    use_project(project, monkeypatch)
    params_before = (project / "params.yaml").read_text()
    for command in (["validate"], ["run", "--no-exp"]):
        result = runner.invoke(app, [*command, "--root", str(project)])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "class 'eel' has no usable image" in result.output, result.output
    assert (project / "params.yaml").read_text() == params_before
    assert not (project / "data/prepared/images.npy").exists() and not (project / "mlflow.db").exists()


def test_ingest_stops_on_a_class_whose_files_all_fail_to_decode(tmp_path: Path):
    """Headers read, pixels do not: only decoding finds out, and ingest stops there, leaving nothing behind."""
    from ssl_lib.data.ingest import ingest

    folder = _folder(tmp_path / "images")
    for i in range(3):
        _truncated(folder / "eel" / f"{i}.png")
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"class 'eel' has no usable image: all 3 of its files are unusable"):
        ingest("folder", folder, 0, 1, None, 1, 0.2, out, workers=1)
    assert not out.exists() and not list(tmp_path.glob(".prepared.*"))


def test_an_empty_class_with_a_healthy_one_is_named_first(tmp_path: Path):
    folder = _folder(tmp_path / "images")
    (folder / "eel").mkdir()
    (folder / "fox").mkdir()
    from tasks.preflight import check_label_budget

    with pytest.raises(DataError, match=r"class 'eel' has no usable image \(so have 1 more: 'fox'\)"):
        check_label_budget(_params(folder))
