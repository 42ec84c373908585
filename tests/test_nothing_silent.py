"""The smaller silent failures of issue #28, each as one line or the right retry: true help texts, a word when a
prediction folder is empty, one line for an MLflow store that cannot be written, and no retry of a full disk."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _flat(text: str) -> str:
    """Help text without the box drawing and line wrapping of typer's rich output."""
    return " ".join(text.replace("│", " ").split())


def test_validate_help_does_not_claim_to_write_params():
    validate, run = (_flat(runner.invoke(app, [command, "--help"]).output) for command in ("validate", "run"))
    assert "for this check only" in validate and "Written into params.yaml" not in validate
    assert "Written into params.yaml" in run  # which `sslpipe run` does, as `dvc exp run -S` would


def test_predicting_an_empty_folder_says_so(tmp_path: Path, monkeypatch):
    import tasks.predict
    from tasks.predict import LoadedModel

    monkeypatch.setattr(tasks.predict, "load_model", lambda uri: LoadedModel(object(), 1, 8, 8, ["a", "b"]))
    (tmp_path / "images" / "nested").mkdir(parents=True)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    output = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(tmp_path / "images"), "--model", "models:/m@champion",
                                 "--output", str(output), "--root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "holds no image file" in result.output, result.output
    assert "nothing to predict" in result.output and not output.exists()


@pytest.mark.parametrize("problem", ["folder missing", "read-only file"])
def test_an_unwritable_mlflow_store_is_one_line_before_anything_runs(project: Path, tmp_path: Path, monkeypatch,
                                                                     problem: str):
    store = tmp_path / ("missing" if problem == "folder missing" else "store") / "mlflow.db"
    if problem == "read-only file":
        store.parent.mkdir()
        store.write_bytes(b"")
        store.chmod(0o444)
        if os.geteuid() == 0:  # root writes read-only files: ask the kernel's question as another user would get it
            real = os.access
            monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == store and
                                mode & os.W_OK else real(path, mode, **kw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    params_before = (project / "params.yaml").read_bytes()
    result = runner.invoke(app, ["run", "--root", str(project)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
    assert f"the MLflow store {store} cannot be written" in result.output and "MLFLOW_TRACKING_URI" in result.output
    assert (project / "params.yaml").read_bytes() == params_before and not (project / "data").exists()

    from tasks.tracking import StoreNotWritable, experiment_id

    with pytest.raises(StoreNotWritable):  # a stage's first MLflow call: one line and exit 2 from its CLI
        experiment_id()


def test_a_full_disk_in_a_stage_is_a_crash_that_is_not_retried(tmp_path: Path, monkeypatch):
    from flows.stages import StageFailed, read_stage_report, retry_unless_user_error, stage_failure
    from tasks.common import STAGE_REPORT_ENV, run_stage_cli

    report_path = tmp_path / "report.json"
    monkeypatch.setenv(STAGE_REPORT_ENV, str(report_path))

    def body(params):
        raise OSError(errno.ENOSPC, "No space left on device", "data/prepared/images.npy")

    with pytest.raises(OSError):  # the stage keeps its traceback
        run_stage_cli("ingest", body, load=lambda path: None)
    report = read_stage_report(report_path)
    assert json.loads(report_path.read_text())["crash"] == {"kind": "OSError", "errno": "ENOSPC", "retry": False}

    class State:  # what Prefect hands the retry condition
        def __init__(self, error: Exception) -> None:
            self.error = error

        def result(self):
            raise self.error

    full = stage_failure(report, "ingest", 1, "OSError: [Errno 28] No space left on device")
    assert type(full) is StageFailed and not retry_unless_user_error(None, None, State(full))
    assert retry_unless_user_error(None, None, State(stage_failure({"stage": "ingest"}, "ingest", 1, "boom")))
    assert not retry_unless_user_error(None, None, State(OSError(errno.ENOSPC, "No space left on device")))
    assert retry_unless_user_error(None, None, State(OSError(errno.ECONNRESET, "reset")))
