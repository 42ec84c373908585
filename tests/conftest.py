"""Shared fixtures: a real temporary git + DVC project on digits, and one real Prefect test server; the session's
environment and the scheduling of modules. What test modules import is in ``tests/helpers.py``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.environment import OFFLINE_SWITCHES
from tests.helpers import make_project, use_project


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


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh tiny git + DVC project on digits, this process pointed at its MLflow store for the test."""
    path = make_project(tmp_path / "proj")
    use_project(path, monkeypatch)
    return path


# --- the learning tests' data: sklearn digits, in process -------------------------------------------------

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


# --- scheduling: the longest test modules first --------------------------------------------------------------

# ``make test`` runs ``--dist loadfile`` on one worker per core: whole modules, handed to whichever worker is free,
# in collection order. Started last, a long module leaves the other worker idle at the end; started first, the
# short ones fill in around it (longest-processing-time-first). Seconds per module come from the table this
# suite prints at its end ("seconds per test module"); modules not listed are short and run last.
LONGEST_FIRST = (
    "tests/test_pipeline.py", "tests/test_every_method.py", "tests/test_retrain.py", "tests/test_engine.py",
    "tests/test_sweep.py", "tests/test_beyond_one_machine.py", "tests/test_checkout_lock.py",
    "tests/test_methods_pretext.py", "tests/test_stage_runner.py", "tests/test_bad_input.py",
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
