"""The pipeline's stages run through DVC, and the Prefect tasks that run them, built from one list.

A stage process (``python -m tasks.<stage>``, started by DVC) reports back through a small JSON file whose
path it finds in ``$SSLPIPE_STAGE_REPORT``: that it ran, when its process started, when its work began and
ended, and, when it stops on a user mistake, the error's kind and message. The runner reads that report, so
whether a stage ran and whether a failure is worth a retry are decided by what the stage says, not by
matching DVC's console text.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import STAGE_REPORT_ENV, STAGES
from tasks.environment import configure_environment


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    executed: bool
    seconds: float  # wall time of `dvc repro` for this stage
    # From the stage process's report (None when DVC skipped the stage): seconds from the process's start to
    # the start of its work (interpreter, imports, params), and of the work itself.
    startup_seconds: float | None = None
    work_seconds: float | None = None

    @property
    def process_seconds(self) -> float | None:
        """The stage process's life up to its outputs: start-up plus work (None when DVC skipped the stage)."""
        if self.startup_seconds is None or self.work_seconds is None:
            return None
        return self.startup_seconds + self.work_seconds


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero for a reason other than a user mistake: a bug or a transient failure.

    ``retry``: whether a retry may help; not for a crash its report says would only repeat (a full disk).
    """

    def __init__(self, stage: str, returncode: int, tail: str, retry: bool = True) -> None:
        self.stage, self.returncode, self.tail, self.retry = stage, returncode, tail, retry
        super().__init__(f"stage {stage!r} failed (dvc exit {returncode}):\n{tail}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Task runners (Dask, process pools) pickle a task's exception; rebuild it from its fields.
        return type(self), (self.stage, self.returncode, self.tail, self.retry)


class StageUserError(StageFailed):
    """The stage stopped on a user mistake (its ``UserError``): a retry cannot fix it; the message says what can."""

    def __init__(self, stage: str, returncode: int, tail: str, kind: str, message: str) -> None:
        super().__init__(stage, returncode, tail, retry=False)
        self.kind, self.message = kind, message
        self.args = (f"{stage}: {message}",)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return type(self), (self.stage, self.returncode, self.tail, self.kind, self.message)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and its stage commands: the offline switches, and this venv first on PATH.

    DVC runs ``python -m tasks.<stage>`` through a shell, so the interpreter that has this project
    installed must come first on PATH even when the user did not activate the venv.
    """
    configure_environment()
    env = dict(os.environ)
    # Stage output reaches Prefect's log line by line, through a pipe: ssl_lib.progress prints its bars there as
    # a line every $SSLPIPE_PROGRESS_SECONDS, not as carriage-return frames.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def dvc_command(args: list[str]) -> list[str]:
    """The command line of ``dvc ARGS``, with this interpreter (the project's environment has DVC)."""
    return [sys.executable, "-m", "dvc", *args]


def read_stage_report(path: Path) -> dict[str, Any] | None:
    """The report a stage process left at ``path``; None when no stage got far enough to write one."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def user_error_from(report: dict[str, Any] | None, stage: str, returncode: int, tail: str) -> StageUserError | None:
    """The ``StageUserError`` a failed stage's report describes, or None when it did not stop on a user mistake.

    DVC stops at the first failing stage, so the report's own stage name (when present) is the one that failed.
    """
    error = (report or {}).get("user_error")
    if not error:
        return None
    return StageUserError((report or {}).get("stage", stage), returncode, tail, error["kind"], error["message"])


def stage_failure(report: dict[str, Any] | None, stage: str, returncode: int, tail: str) -> StageFailed:
    """The error for a failed stage: its user error when it stopped on one, else a crash, which may be retried
    unless its report says a retry would only repeat it."""
    crash = (report or {}).get("crash") or {}
    return user_error_from(report, stage, returncode, tail) or StageFailed(stage, returncode, tail,
                                                                         retry=crash.get("retry", True))


def run_dvc_stage(stage: str, root: Path, env_extra: dict[str, str] | None = None, force: bool = False,
                  echo: Callable[[str], None] = print) -> StageOutcome:
    """``dvc repro --single-item STAGE`` (ingest: ``dvc repro ingest``, with the fingerprint stage before it): DVC
    decides whether the stage is stale and records it in dvc.lock."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    # ingest brings its upstream, the fingerprint stage that dvc.yaml runs on every repro (it tells DVC whether the
    # source's data changed); every other stage runs alone.
    args = ["repro", *([] if stage == "ingest" else ["--single-item"]), stage] + (["--force"] if force else [])
    with tempfile.TemporaryDirectory(prefix="sslpipe-stage-") as tmp:
        report_path = Path(tmp) / "report.json"
        env = subprocess_env({**(env_extra or {}), STAGE_REPORT_ENV: str(report_path)})
        start = time.perf_counter()
        proc = subprocess.Popen(dvc_command(args), cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            echo(line)
        returncode = proc.wait()
        seconds = time.perf_counter() - start
        report = read_stage_report(report_path)
    if returncode != 0:
        tail = "\n".join(lines[-40:])
        raise stage_failure(report, stage, returncode, tail)
    if report is None or report.get("stage") != stage:
        # DVC found the stage up to date (or restored it from its run cache); only the fingerprint may have run.
        return StageOutcome(stage=stage, executed=False, seconds=seconds)
    return StageOutcome(stage=stage, executed=True, seconds=seconds,
                        startup_seconds=report["work_started"] - report["process_started"],
                        work_seconds=report["work_ended"] - report["work_started"])


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a failure unless it is a user mistake, which a retry cannot fix."""
    from ssl_lib.errors import UserError
    from tasks.common import NO_RETRY_ERRNOS

    try:
        state.result()
    except (StageUserError, UserError):
        return False
    except StageFailed as err:
        return err.retry
    except OSError as err:  # in the flow's own process: a full disk stays full
        return err.errno not in NO_RETRY_ERRNOS
    except Exception:
        return True
    return False


SKIPPED = "Skipped"  # the state name of a stage DVC found up to date


def skipped_state(outcome: StageOutcome) -> Any:
    """A Completed state named ``Skipped``: the Prefect UI shows a stage DVC did not run apart from one that ran,
    and the flow still gets its outcome as the task's result."""
    from prefect.states import Completed

    return Completed(name=SKIPPED, data=outcome,
                     message=f"DVC found {outcome.stage} up to date (checked in {outcome.seconds:.1f} s)")


def _stage_task(stage: str) -> Any:
    """The Prefect task for ``stage``: it runs the stage through DVC, never around it.

    Prefect's own caching stays off: DVC alone decides what is stale. Retries cover transient
    failures (a locked file, a killed worker); a user error is not retried.
    """
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE

    @task(name=stage, task_run_name=stage, retries=1, retry_delay_seconds=5,
          retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE, persist_result=False)
    def stage_task(root: str, env_extra: dict[str, str] | None = None, force: bool = False) -> Any:
        logger = get_run_logger()
        outcome = run_dvc_stage(stage, Path(root), env_extra, force=force, echo=logger.info)
        logger.info("stage %s %s in %.1f s", stage, "ran" if outcome.executed else "was up to date",
                    outcome.seconds)
        return outcome if outcome.executed else skipped_state(outcome)

    return stage_task


@functools.cache
def stage_tasks() -> dict[str, Any]:
    """One Prefect task per stage, in pipeline order, built on first use (importing Prefect is not free)."""
    return {stage: _stage_task(stage) for stage in STAGES}
