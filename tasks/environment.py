"""Where the project lives and how its tools are configured, decided once per process.

``OFFLINE_SWITCHES`` is the one list of the telemetry/offline switches: every Python process sets them through
``configure_environment()``, the tests through conftest, and the Makefile exports them (for the tools it starts
directly) by running this file, which is why it imports nothing outside the standard library.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# DVC runs queued/temp experiments in copies under .dvc/tmp/exps/...; results must land in the real root.
_DVC_TEMP_WORKSPACE = re.compile(r"^(.*?)/\.dvc/tmp/exps/.*$")

OFFLINE_SWITCHES = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    # The temporary Prefect server needs ~24 s to migrate a fresh database; the 20 s default is too close.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def project_root() -> Path:
    """The repository root: $SSLPIPE_ROOT, else $DVC_ROOT, else the current directory.

    A DVC temp workspace (``<root>/.dvc/tmp/exps/...``) maps back to ``<root>`` so that the MLflow
    store and registry are shared with the normal workspace instead of being lost with the copy.
    """
    raw = os.environ.get("SSLPIPE_ROOT") or os.environ.get("DVC_ROOT") or os.getcwd()
    resolved = str(Path(raw).resolve())
    match = _DVC_TEMP_WORKSPACE.match(resolved)
    return Path(match.group(1) if match else resolved)


def default_tracking_uri(root: Path | None = None) -> str:
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def configure_environment() -> None:
    """Set the offline switches and anchor the MLflow store; explicit user settings win."""
    for key, value in OFFLINE_SWITCHES.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri())
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


if __name__ == "__main__":  # `python tasks/environment.py`: KEY=value per switch, for the Makefile
    print(" ".join(f"{key}={value}" for key, value in OFFLINE_SWITCHES.items()))
