"""What test modules import: the repository root, a tiny git + DVC project on digits, the settings tests train with.

Plain functions and constants (no fixtures, no hooks, nothing run at import): the fixtures and the session's
environment live in ``tests/conftest.py``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from ssl_lib.classifier import FinetuneSettings
    from ssl_lib.pretrain_plan import PretrainSettings
    from ssl_lib.self_train import SelfTrainSettings

REPO = Path(__file__).resolve().parents[1]

# Small enough for 2 CPU cores in seconds, large enough that every stage does real work.
TINY_PARAMS = {
    "data": {"source": "digits", "labels_per_class": 5, "val_per_class": 3, "label_fraction": None},
    "pretrain": {"epochs": 2, "batch_size": 128, "max_images": None, "backbone": "convnet_small",
                 "options": {}},
    "finetune": {"epochs": 4, "lp_epochs": 2, "batch_size": 32, "registered_model_name": "test-classifier"},
    "self_train": {"method": "label_propagation", "rounds": 2, "epochs": 1, "batch_size": 128, "knn_k": 10},
    "evaluate": {"knn_k": 5},
}


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and value and isinstance(base.get(key), dict):  # {} replaces
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def run_cmd(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def make_project(path: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC repo holding this project's dvc.yaml and params.yaml (overridden), committed."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, path / name)
    # The stages list their code as deps (and run the project's own copy, as in a clone).
    for package in ("ssl_lib", "tasks"):
        shutil.copytree(REPO / package, path / package, ignore=shutil.ignore_patterns("__pycache__"))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = _deep_update(_deep_update(raw, TINY_PARAMS), params or {})
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (path / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.prefect/\n__pycache__/\n")
    run_cmd(["git", "init", "-q", "-b", "main"], path)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], path)
    run_cmd([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], path)
    run_cmd(["git", "add", "-A"], path)
    run_cmd(["git", "commit", "-qm", "init"], path)
    return path


def run_stage_here(stage: str, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``python -m tasks.<stage>`` in ``project`` as DVC would, but in this process: the stage's own code from
    its ``__main__`` block, without a new interpreter importing torch and MLflow again. A user error leaves as the
    command's would: ``SystemExit(2)`` with its one line on stderr. ``monkeypatch`` undoes the change of directory.
    """
    import runpy
    import warnings

    monkeypatch.chdir(project)  # DVC runs a stage in the repository root
    with warnings.catch_warnings():
        # run_module executes a fresh copy of the module as __main__, as `python -m` does, and warns when the
        # package's import already loaded one (which this run does not use).
        warnings.filterwarnings("ignore", r"'tasks\.\w+' found in sys\.modules", RuntimeWarning)
        runpy.run_module(f"tasks.{stage}", run_name="__main__", alter_sys=True)


def project_env(path: Path) -> dict[str, str]:
    """The variables that point a process (and the stage subprocesses it starts) at ``path``'s MLflow store."""
    return {"SSLPIPE_ROOT": str(path), "MLFLOW_TRACKING_URI": f"sqlite:///{path / 'mlflow.db'}"}


def use_project(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process at ``path``'s project (``project_env``) until ``monkeypatch`` undoes it: a test's
    ``monkeypatch`` fixture, or ``pytest.MonkeyPatch.context()`` in a module-scoped fixture."""
    for key, value in project_env(path).items():
        monkeypatch.setenv(key, value)


# --- the learning tests' data (the digits fixture is conftest's) ----------------------------------------------

BACKBONE = "convnet_small"


def digits_settings(method: str, epochs: int, **kw: Any) -> PretrainSettings:
    """Pretraining settings for the digits tests: convnet_small, batch 128, seed 0, the method's own options, on the
    CPU, the engine deciding per device, no checkpoints."""
    base = dict(method=method, backbone=BACKBONE, epochs=epochs, batch_size=128, lr=3e-3, weight_decay=1e-4,
                seed=0, max_images=None, device="cpu", options={}, precision="auto", channels_last=None, compile=None,
                data_placement="auto", checkpoint_every=0)
    base.update(kw)
    from ssl_lib.pretrain_plan import PretrainSettings

    return PretrainSettings(**base)


def _param_defaults(section: Any, settings: type) -> dict[str, Any]:
    """The defaults of a params section (ssl_lib.config) that are fields of ``settings`` under the same name."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {key: value for key, value in section.model_dump().items() if key in names}


def finetune_settings(**kw: Any) -> FinetuneSettings:
    """A test's fine-tuning settings: ``kw``, else seed 0 and 2-pixel shifts, else the finetune params' defaults."""
    from ssl_lib.classifier import FinetuneSettings
    from ssl_lib.config import FinetuneParams

    return FinetuneSettings(**{**_param_defaults(FinetuneParams(), FinetuneSettings), "seed": 0, "max_shift_px": 2,
                               **kw})


def self_train_settings(**kw: Any) -> SelfTrainSettings:
    """A test's self-training settings: ``kw`` (``steps`` and ``epochs`` among them), else seed 0 and 2-pixel shifts,
    else the self_train params' defaults, not sized to any pool."""
    from ssl_lib.config import SelfTrainParams
    from ssl_lib.self_train import SelfTrainSettings

    return SelfTrainSettings(**{**_param_defaults(SelfTrainParams(), SelfTrainSettings), "seed": 0,
                                "max_shift_px": 2, **kw})
