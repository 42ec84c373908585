"""A killed ingest leaves git clean after the next one (issue #28): its temporary directory is git-ignored and
removed, a kill between the two renames of the swap gets the previous version back, and the tracked
data/prepared/.gitignore is never deleted. Each with a real SIGKILL, in a subprocess."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_lib.data.ingest import ingest
from tests.helpers import REPO, run_cmd

BUDGET = dict(seed=0, labels_per_class=1, label_fraction=None, val_per_class=1, test_fraction=0.2)

_KILLED = """
import os, signal, sys
from ssl_lib import io
from ssl_lib.data import image_file
from ssl_lib.data.ingest import ingest

folder, out, where = sys.argv[1], os.path.abspath(sys.argv[2]), sys.argv[3]

def killed_after(real, hit):
    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        if hit(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if where == "decoding":
    image_file.compact_rows = killed_after(image_file.compact_rows, lambda *a: True)
elif where == "between the renames":  # the previous version moved aside, the new one not yet in place
    io.os.replace = killed_after(os.replace, lambda src, dst: os.path.abspath(src) == out)
else:  # "after the swap": the new version in place, the previous one not yet removed
    io.os.replace = killed_after(os.replace, lambda src, dst: os.path.abspath(dst) == out)
ingest("folder", folder, 0, 1, None, 1, 0.2, out, workers=1)
"""


def _pngs(root: Path, tag: str, per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(len(tag))
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name / f"{tag}{i}.png")


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    """A git checkout with this repository's .gitignore and an ingested data/prepared, its .gitignore tracked."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    _pngs(tmp_path / "images", "a", 6)
    ingest("folder", tmp_path / "images", **BUDGET, out_dir=repo / "data/prepared", workers=1)
    shutil.copy(REPO / "data/prepared/.gitignore", repo / "data/prepared/.gitignore")  # as DVC writes it
    run_cmd(["git", "init", "-q", "-b", "main"], repo)
    run_cmd(["git", "add", ".gitignore", "data/prepared/.gitignore"], repo)
    run_cmd(["git", "commit", "-qm", "init"], repo)
    return repo


def _git_status(repo: Path) -> str:
    return run_cmd(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout


@pytest.mark.parametrize("where", ["decoding", "between the renames", "after the swap"])
def test_a_killed_ingest_leaves_git_clean_after_the_next_one(checkout: Path, tmp_path: Path, where: str):
    out = checkout / "data/prepared"
    gitignore = (out / ".gitignore").read_bytes()
    _pngs(tmp_path / "images", "b", 2)
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path / "images"), str(out), where],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9
    leftovers = sorted(p.name for p in (checkout / "data").iterdir() if p.name != "prepared")
    assert leftovers, "the kill left nothing behind: the test no longer probes what it names"
    if where == "decoding":  # its temporary directory, with the decoded images, is git-ignored
        assert _git_status(checkout) == ""
    if where == "after the swap":  # the new version in place keeps the tracked .gitignore
        assert (out / ".gitignore").read_bytes() == gitignore

    meta = ingest("folder", tmp_path / "images", **BUDGET, out_dir=out, workers=1)
    assert meta["num_images"] == 16
    assert sorted(p.name for p in (checkout / "data").iterdir()) == ["prepared"]
    assert (out / ".gitignore").read_bytes() == gitignore
    assert _git_status(checkout) == ""


def test_a_temporary_directory_of_a_live_ingest_is_left_alone(checkout: Path, tmp_path: Path):
    from ssl_lib.io import recover_dir

    live = checkout / "data" / f".prepared.{os.getpid()}.abc.tmp"
    live.mkdir()
    recover_dir(checkout / "data/prepared")
    assert live.is_dir()
