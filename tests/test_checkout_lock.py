"""One run per checkout at a time (issue #28): a second `sslpipe run`, `sweep` or `stage` in a checkout another
process holds stops at once, before it touches params.yaml, with one line saying which run holds it; the lock
goes with its process, however that process ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.checkout_lock import CheckoutBusy, hold_checkout, lock_path
from tests.helpers import REPO, run_cmd

runner = CliRunner()

_HOLDER = """
import sys, time
from tasks.checkout_lock import hold_checkout
with hold_checkout(sys.argv[1], "sslpipe run --set seed=4"):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture()
def held(project: Path):
    """Another process holding ``project``'s checkout, as a run in progress would."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(project)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", [["run", "--set", "seed=5"], ["sweep", "--methods", "rotation", "--labels", "1"],
                                     ["stage", "ingest"]])
def test_a_second_run_stops_before_touching_params(project: Path, held: subprocess.Popen, command: list[str]):
    params_before = (project / "params.yaml").read_bytes()
    result = runner.invoke(app, [*command, "--root", str(project)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output
    for fragment in (f"pid {held.pid}", "`sslpipe run --set seed=4`", "since ", "another clone"):
        assert fragment in result.output, (fragment, result.output)
    assert (project / "params.yaml").read_bytes() == params_before
    assert not (project / "mlflow.db").exists() and not (project / "data").exists()


def test_the_lock_dies_with_its_process_and_stays_out_of_git(project: Path, held: subprocess.Popen):
    with pytest.raises(CheckoutBusy):
        with hold_checkout(project):
            pass
    os.kill(held.pid, signal.SIGKILL)
    held.wait()
    with hold_checkout(project):  # no stale lock to clean up
        with hold_checkout(project):  # the same process may enter again (a flow inside a command)
            assert lock_path(project).is_file()
    assert run_cmd(["git", "status", "--porcelain"], project).stdout == ""  # .dvc/tmp is git-ignored


def test_a_stage_beside_another_run_stops_and_one_started_by_it_runs(project: Path, held: subprocess.Popen,
                                                                     monkeypatch, capsys):
    """A plain `dvc repro` beside a running flow: its first stage stops before reading params.yaml."""
    from tasks.common import USER_ERROR_EXIT, run_stage_cli

    monkeypatch.chdir(project)  # DVC runs a stage in the repository root
    ran: list[object] = []
    with pytest.raises(SystemExit) as info:
        run_stage_cli("ingest", ran.append, load=lambda path: "params")
    assert info.value.code == USER_ERROR_EXIT and ran == []
    assert f"sslpipe ingest: error: another run holds the checkout {project}: pid {held.pid}" in capsys.readouterr().err
    held.kill()
    held.wait()

    check = [sys.executable, "-c", "from tasks.checkout_lock import check_stage_may_run; check_stage_may_run('.')"]
    with hold_checkout(project):  # the run holding it starts a stage (through DVC: a descendant)
        child = subprocess.run(check, cwd=project, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                               text=True)
        assert child.returncode == 0, child.stderr
        run_stage_cli("ingest", ran.append, load=lambda path: "params")  # or runs it in this very process
    assert ran == ["params"]


@pytest.mark.slow
def test_two_real_runs_at_once_leave_mlflow_agreeing_with_dvc_lock(project: Path, prefect_server):
    """A real `sslpipe run --set seed=4` holds the checkout; a second real one with seed=5 stops before it touches
    params.yaml; the first finishes, and its MLflow record, params.yaml and dvc.lock all say seed 4."""
    import time

    import yaml
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--set", "seed=4", "--no-exp",
                              "--root", str(project)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until the first run holds the checkout
            try:
                with hold_checkout(project):
                    pass
            except CheckoutBusy:
                break
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.2)
        second = runner.invoke(app, ["run", "--set", "seed=5", "--root", str(project)])
        assert second.exit_code == 2 and f"pid {first.pid}" in second.output, second.output
        output, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    assert yaml.safe_load((project / "params.yaml").read_text())["seed"] == 4
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert {stage["params"]["params.yaml"]["seed"] for stage in lock["stages"].values()
            if "seed" in stage.get("params", {}).get("params.yaml", {})} == {4}
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")  # the store the runs wrote to
    experiment = client.get_experiment_by_name("ssl-pipeline")
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["seed"] == "4", [r.data.params.get("seed") for r in parents]
