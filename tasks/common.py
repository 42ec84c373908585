"""What every stage process shares: its CLI entry, user-error handling, and the report it leaves for the runner.

A stage module holds the stage's work and this entry, nothing else: it imports neither Prefect nor DVC, and
what its work needs (torch, MLflow) it imports inside that work. The Prefect tasks that run the stages are
built in ``flows.stages``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssl_lib.errors import UserError
from tasks.checkout_lock import check_stage_may_run
from tasks.environment import configure_environment

USER_ERROR_EXIT = 2
# Failures a retry would only repeat: a full disk (or quota) stays full until someone frees space.
NO_RETRY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
STAGES = ("ingest", "pseudo_labels", "pretrain", "finetune", "self_train", "evaluate")
# Where the runner (flows.stages) wants this stage's report: that it ran, its timings, its user error if any.
STAGE_REPORT_ENV = "SSLPIPE_STAGE_REPORT"

log = logging.getLogger("sslpipe")


def process_start_time() -> float:
    """When this process was created (epoch seconds): the start of its interpreter, before any import."""
    import psutil

    return psutil.Process().create_time()


def _write_report(report: dict) -> None:
    target = os.environ.get(STAGE_REPORT_ENV)
    if target:
        Path(target).write_text(json.dumps(report))


# Libraries every stage needs. DVC runs a stage as `python -m tasks.<stage>` with the first `python` on PATH: outside
# the project's virtual environment that is another interpreter, which would fail with an import traceback.
_REQUIRED = ("torch", "numpy", "pandas", "pydantic", "yaml", "psutil")


def require_project_environment(stage: str) -> None:
    """Exit with one line naming the fix if this interpreter lacks the project's libraries (a lookup, no import)."""
    import importlib.util

    missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"sslpipe {stage}: error: {sys.executable} has no {', '.join(missing)}: run DVC from the project's "
              "virtual environment (`source .venv/bin/activate`, then `dvc repro`; or `make repro`)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)


def run_stage_cli(stage: str, body: Callable[[Any], object], load: Callable[[str], Any] | None = None) -> None:
    """Entry point of ``python -m tasks.<stage>``: what dvc.yaml calls.

    ``load`` reads params.yaml for ``body``: all of it (PipelineParams) by default, or one section. A
    ``UserError`` is printed as one line and the process exits 2; anything else is a bug (or a transient failure)
    and keeps its traceback.
    """
    require_project_environment(stage)
    if load is None:
        from ssl_lib.config import load_params as load
    configure_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = {"stage": stage, "process_started": process_start_time(), "work_started": time.time()}
    try:
        # DVC runs each stage in the repository root; a run that holds it and did not start this stage stops it.
        check_stage_may_run(".")
        params = load("params.yaml")
        body(params)
    except UserError as err:
        _write_report({**report, "user_error": {"kind": type(err).__name__, "message": str(err)}})
        print(f"sslpipe {stage}: error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except OSError as err:
        if err.errno in NO_RETRY_ERRNOS:  # still a crash with its traceback, but the runner must not retry it
            _write_report({**report, "crash": {"kind": type(err).__name__, "errno": errno.errorcode[err.errno],
                                               "retry": False}})
        raise
    _write_report({**report, "work_ended": time.time()})
