"""How a stage's failure reaches the runner: a user mistake by its kind (one line, no retry), a bug with its
traceback (retried once, as a transient failure might be). Run for real: DVC starts the stage process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.stages import StageFailed, StageUserError, run_dvc_stage, stage_tasks

BUG = "raise ZeroDivisionError('a bug in the ingest stage')"


def _plant_bug(project: Path) -> None:
    """Make the project's own copy of the ingest stage (the code DVC runs) fail as a bug would."""
    stage = project / "tasks/ingest.py"
    source = stage.read_text()
    head, sep, body = source.partition("def run(params: PipelineParams) -> dict:\n")
    assert sep, "tasks/ingest.py no longer defines run(params); update this test"
    stage.write_text(f"{head}{sep}    {BUG}\n{body}")


def test_a_stage_run_reports_its_timings(project: Path):
    outcome = run_dvc_stage("ingest", project, echo=lambda line: None)
    assert outcome.executed
    assert 0 < outcome.startup_seconds < outcome.process_seconds <= outcome.seconds
    assert outcome.work_seconds > 0
    again = run_dvc_stage("ingest", project, echo=lambda line: None)
    assert not again.executed and again.work_seconds is None


def test_a_user_mistake_arrives_as_its_kind(project: Path):
    (project / "params.yaml").write_text((project / "params.yaml").read_text()
                                         .replace("labels_per_class: 5", "labels_per_class: 500"))
    with pytest.raises(StageUserError) as info:
        run_dvc_stage("ingest", project, echo=lambda line: None)
    assert info.value.kind in ("LabelBudgetError", "DataError", "ConfigError")
    assert "labels_per_class" in info.value.message and "Traceback" not in info.value.message


def test_a_bug_keeps_its_traceback(project: Path):
    _plant_bug(project)
    with pytest.raises(StageFailed) as info:
        run_dvc_stage("ingest", project, echo=lambda line: None)
    assert not isinstance(info.value, StageUserError)
    assert "Traceback" in info.value.tail and "ZeroDivisionError: a bug in the ingest stage" in info.value.tail
    direct = subprocess.run([sys.executable, "-m", "tasks.ingest"], cwd=project, capture_output=True, text=True)
    assert direct.returncode == 1 and "Traceback" in direct.stderr


def test_prefect_retries_a_bug_but_not_a_user_mistake(project: Path, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    @flow(name="stage-retry-check")
    def one_stage(root: str) -> None:
        stage_tasks()["ingest"](root)

    def attempts_of_failed_run() -> int:
        state = one_stage(str(project), return_state=True)
        assert state.is_failed()
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        (run,) = runs
        return run.run_count

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("labels_per_class: 5", "labels_per_class: 500"))
    assert attempts_of_failed_run() == 1
    params.write_text(params.read_text().replace("labels_per_class: 500", "labels_per_class: 5"))
    _plant_bug(project)
    assert attempts_of_failed_run() == 2
