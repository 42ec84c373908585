"""Look at the UIs as a user does: a tiny digits pipeline in a temp project, then headless Chromium screenshots of
the MLflow pages (`make ui`) and the Prefect flow runs (`make serve`'s server).

    python -m scripts.ui_screenshots --out ui-screenshots   # from the repository root

Two flow runs against a real `prefect server start` (the Makefile's `prefect-server` recipe, on a free port): the
first runs every stage, the second changes `finetune.lp_epochs` (DVC skips ingest, pseudo_labels and pretrain, and
the champion rule decides for a second version). Then `mlflow ui` over the project's store, and one PNG per page
under ``--out``. Takes about 5 minutes on 2 cores. Needs `chromium` (Debian's package).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"the server behind {url} exited ({process.returncode})") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {seconds:.0f} s") from None
            time.sleep(1)


@contextmanager
def server(command: list[str], health: str, log: Path, env: dict[str, str] | None = None):
    """A server process (its own session, so that it and its workers stop together), up once ``health`` answers."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            wait_for(health, process)
            yield process
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def screenshot(url: str, path: Path, height: int = 1000) -> None:
    """One headless Chromium screenshot of ``url`` (15 s of virtual time for the page's scripts)."""
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--window-size=1600,{height}",
                    "--virtual-time-budget=15000", "--hide-scrollbars", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path.name}: {url}")


def run_pipeline(project: Path) -> list[dict]:
    """The two flow runs, against the Prefect server $PREFECT_API_URL names."""
    from flows.pipeline import ssl_pipeline

    first = ssl_pipeline(root=str(project))
    second = ssl_pipeline(overrides={"finetune.lp_epochs": 3}, root=str(project))
    return [first, second]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ui-screenshots"))
    parser.add_argument("--keep", action="store_true", help="keep the temp project (its path is printed)")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        raise SystemExit("error: chromium not found (apt-get install chromium)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="sslpipe-ui-"))
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    # Before Prefect is imported (tests.conftest imports it): it reads its settings once.
    os.environ["PREFECT_API_URL"] = prefect_api
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect")}
    prefect = ["make", "-s", "-C", str(REPO), "prefect-server", f"PREFECT_PORT={prefect_port}",
               f"BIN={Path(sys.executable).parent}", f"PYTHON={sys.executable}"]
    project = work / "proj"
    try:
        with server(prefect, f"{prefect_api}/health", work / "prefect.log", env):
            import tests.conftest  # noqa: F401  (the test session's environment, and Prefect imported)
            from tests.helpers import make_project, project_env  # the test suite's tiny digits project

            make_project(project)
            os.environ.update(project_env(project))  # for the rest of this process
            summaries = run_pipeline(project)
            with server([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                         os.environ["MLFLOW_TRACKING_URI"], "--host", "127.0.0.1", "--port", str(mlflow_port),
                         "--workers", "1"], f"http://127.0.0.1:{mlflow_port}/health", work / "mlflow.log"):
                take_screenshots(out, summaries, prefect_port, mlflow_port)
    finally:
        if args.keep:
            print(f"project kept: {project}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def take_screenshots(out: Path, summaries: list[dict], prefect_port: int, mlflow_port: int) -> None:
    from mlflow import MlflowClient

    from tasks.tracking import MODEL_TRAINING_VIEW

    client = MlflowClient()
    first, second = (client.get_run(s["mlflow_run_id"]) for s in summaries)
    experiment = second.info.experiment_id
    base = f"http://127.0.0.1:{mlflow_port}"
    final = second.outputs.model_outputs[0].model_id if second.outputs.model_outputs else None
    registered = client.search_registered_models()[0].name
    # The links the project prints (summary["mlflow_run_url"]) point at `make ui`'s port, 5000: the same paths here.
    pages = {
        "01-mlflow-home": f"{base}/",
        "02-mlflow-experiment": f"{base}/#/experiments/{experiment}?{MODEL_TRAINING_VIEW}",
        "03-mlflow-experiment-without-view": f"{base}/#/experiments/{experiment}",
        "04-mlflow-run": summaries[1]["mlflow_run_url"].replace("http://127.0.0.1:5000", base),
        "05-mlflow-run-model-metrics": f"{base}/#/experiments/{experiment}/runs/{second.info.run_id}/model-metrics?"
                                       f"{MODEL_TRAINING_VIEW}",
        "06-mlflow-logged-models": f"{base}/#/experiments/{experiment}/models?{MODEL_TRAINING_VIEW}",
        "07-mlflow-registered-model": f"{base}/#/models/{registered}?{MODEL_TRAINING_VIEW}",
        "08-mlflow-compare": f"{base}/#/compare-runs?runs=[%22{first.info.run_id}%22,%22{second.info.run_id}%22]"
                             f"&experiments=[%22{experiment}%22]&{MODEL_TRAINING_VIEW}",
    }
    if final:
        pages["09-mlflow-final-model"] = f"{base}/#/experiments/{experiment}/models/{final}?{MODEL_TRAINING_VIEW}"
    for name, url in pages.items():
        screenshot(url, out / f"{name}.png", height=1400 if "run" in name else 1000)
    prefect = f"http://127.0.0.1:{prefect_port}"
    for i, run in enumerate((first, second), start=1):
        flow_run_id = run.data.tags["prefect.flow_run_id"]
        screenshot(f"{prefect}/runs/flow-run/{flow_run_id}", out / f"1{i}-prefect-flow-run-{i}.png", height=1400)
    screenshot(f"{prefect}/runs", out / "13-prefect-runs.png")


if __name__ == "__main__":
    main()
