"""What every stage shares: its CLI entry, user-error handling, and the Prefect task that runs it via DVC."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ssl_lib.config import ConfigError, PipelineParams, load_params
from tasks.environment import configure_environment

USER_ERROR_EXIT = 2
STAGES = ("ingest", "pseudo_labels", "pretrain", "finetune", "self_train", "evaluate")

log = logging.getLogger("sslpipe")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; ``user_error`` marks mistakes that a retry cannot fix."""

    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode = stage, returncode
        self.user_error = f"exited with {USER_ERROR_EXIT}" in tail
        super().__init__(f"stage {stage!r} failed (dvc exit {returncode}):\n{tail}")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user has something to fix; printed without a traceback."""
    from ssl_lib.data.errors import DataError

    return (ConfigError, DataError, FileNotFoundError, ValueError)


def run_stage_cli(stage: str, body: Callable[[PipelineParams], object]) -> None:
    """Entry point of ``python -m tasks.<stage>``: what dvc.yaml calls."""
    configure_environment()
    # force: importing prefect (for the stage's task object) already put a WARNING-level handler on the root
    # logger, which would silently swallow the stages' INFO lines (such as "resuming from step N").
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    try:
        params = load_params("params.yaml")  # DVC runs each stage in the repository root
        body(params)
    except user_error_types() as err:
        print(f"sslpipe {stage}: error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    executed: bool
    seconds: float


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and its stage commands: the offline switches, and this venv first on PATH.

    DVC runs ``python -m tasks.<stage>`` through a shell, so the interpreter that has this project
    installed must come first on PATH even when the user did not activate the venv.
    """
    configure_environment()
    env = dict(os.environ)
    # Stage output reaches Prefect's log line by line: a progress bar refreshed 10 times a second would
    # flood it, so refresh it every 10 s there (tqdm reads its defaults from TQDM_* variables).
    env.setdefault("TQDM_MININTERVAL", "10")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def dvc_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_dvc_stage(stage: str, root: Path, env_extra: dict[str, str] | None = None, force: bool = False,
                  echo: Callable[[str], None] = print) -> StageOutcome:
    """``dvc repro --single-item STAGE``: DVC decides whether the stage is stale and records it in dvc.lock."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    start = time.perf_counter()
    proc = subprocess.Popen(dvc_command(args), cwd=root, env=subprocess_env(env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        echo(line)
    returncode = proc.wait()
    if returncode != 0:
        raise StageFailed(stage, returncode, "\n".join(lines[-40:]))
    skipped = any("didn't change, skipping" in line for line in lines)
    return StageOutcome(stage=stage, executed=not skipped, seconds=time.perf_counter() - start)


def make_stage_task(stage: str):
    """The Prefect task for ``stage``: it runs the stage through DVC, never around it.

    Prefect's own caching stays off: DVC alone decides what is stale. Retries cover transient
    failures (a locked file, a killed worker); a user error (exit 2) is not retried.
    """
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE

    def _retry_unless_user_error(task, task_run, state) -> bool:
        try:
            state.result()
        except StageFailed as err:
            return not err.user_error
        except Exception:
            return True
        return False

    @task(name=stage, task_run_name=stage, retries=1, retry_delay_seconds=5,
          retry_condition_fn=_retry_unless_user_error, cache_policy=NO_CACHE, persist_result=False)
    def stage_task(root: str, env_extra: dict[str, str] | None = None, force: bool = False) -> StageOutcome:
        logger = get_run_logger()
        outcome = run_dvc_stage(stage, Path(root), env_extra, force=force, echo=logger.info)
        logger.info("stage %s %s in %.1f s", stage, "ran" if outcome.executed else "was up to date",
                    outcome.seconds)
        return outcome

    return stage_task
