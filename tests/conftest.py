"""Shared fixtures: a real temporary git + DVC project on digits, and one real Prefect test server."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml

from tasks.environment import OFFLINE_SWITCHES

if TYPE_CHECKING:
    from ssl_lib.pretrain_plan import PretrainSettings

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


def use_project(path: Path) -> None:
    """Point this process (and the stage subprocesses it starts) at ``path``'s MLflow store."""
    os.environ["SSLPIPE_ROOT"] = str(path)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow.db'}"


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker (and the stage processes it starts) its share of the cores.

    Without this every worker's torch would use all cores, and n workers would oversubscribe them n times.
    ``make test`` runs ``--dist loadfile``: a module's tests stay on one worker, in order, sharing its fixtures.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


_share_cores_between_workers()
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="sslpipe-tests-"))
# The offline switches are forced, not defaulted as configure_environment does: the tests stay offline
# whatever the shell exports.
os.environ.update({
    "GIT_AUTHOR_NAME": "ssl-pipeline tests", "GIT_AUTHOR_EMAIL": "tests@ssl-pipeline.local",
    "GIT_COMMITTER_NAME": "ssl-pipeline tests", "GIT_COMMITTER_EMAIL": "tests@ssl-pipeline.local",
    **OFFLINE_SWITCHES, "PREFECT_HOME": str(_SESSION_HOME / "prefect"), "TQDM_DISABLE": "1",
})
# Import prefect now, at collection: it binds its console log handler to the stderr of the moment of
# its first import, and a first import inside a CliRunner.invoke would bind it to a stream that closes.
import prefect.main  # noqa: E402,F401  (prefect.main is what sets its logging up)


@pytest.fixture(scope="session")
def prefect_server():
    """One real (test) Prefect API for the whole session: starting one costs ~20 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def stage_server():
    """One warm stage server per test process (``tasks.stage_server``) for every stage the tests start.

    Each stage process would otherwise spend ~9 s importing torch and MLflow; the stages forked from this server
    skip that, and a flow run inside a test uses this one instead of starting its own. What runs is unchanged:
    ``tests/test_stage_server.py`` checks a stage run this way against the same stage run alone, and tests that
    need a cold stage process set ``SSLPIPE_STAGE_SERVER=off`` for it.
    """
    from flows.stages import stage_server as serving

    with serving(REPO) as env:  # the flows' own way to start and stop one
        os.environ.update(env)
        yield
        for key in env:
            os.environ.pop(key, None)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A fresh tiny git + DVC project on digits, this process pointed at its MLflow store."""
    path = make_project(tmp_path / "proj")
    use_project(path)
    return path


# --- the learning tests' data: sklearn digits, in process -------------------------------------------------

BACKBONE = "convnet_small"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    """sklearn's 8x8 digits upsampled to 16x16 uint8 NHWC, with labels and the channel mean and std."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255.0).round().astype(np.uint8)
    images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]  # (N, 16, 16, 1)
    mean = [float(images.mean() / 255.0)]
    std = [float(images.std() / 255.0)]
    return images, d.target.astype(np.int64), mean, std


def digits_settings(method: str, epochs: int, **kw: Any) -> PretrainSettings:
    """Pretraining settings for the digits tests: convnet_small, batch 128, seed 0, on the CPU."""
    base = dict(method=method, backbone=BACKBONE, epochs=epochs, batch_size=128, lr=3e-3, weight_decay=1e-4,
                seed=0, max_images=None, device="cpu")
    base.update(kw)
    from ssl_lib.pretrain_plan import PretrainSettings

    return PretrainSettings(**base)


# --- scheduling: the longest test modules first --------------------------------------------------------------

# ``make test`` runs ``--dist loadfile`` on one worker per core: whole modules, handed to whichever worker is free,
# in collection order. Started last, a long module leaves the other worker idle at the end; started first, the
# short ones fill in around it (longest-processing-time-first). Seconds per module come from the table this
# suite prints at its end ("seconds per test module"); modules not listed are short and run last.
LONGEST_FIRST = (
    "tests/test_retrain.py", "tests/test_every_method_a.py", "tests/test_every_method_b.py",
    "tests/test_pipeline.py", "tests/test_beyond_one_machine.py", "tests/test_learning.py", "tests/test_sweep.py",
    "tests/test_engine.py", "tests/test_growing_data.py",
)
_MODULE_SECONDS: dict[str, float] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: a module keeps its order


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::")[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _MODULE_SECONDS:
        return
    terminalreporter.write_sep("=", "seconds per test module (setup, call and teardown)")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {module}")
