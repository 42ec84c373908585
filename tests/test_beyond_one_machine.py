"""Past one machine: a DVC remote, an MLflow tracking server on PostgreSQL, and a Prefect process worker."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, make_project, run_cmd, use_project

pytestmark = pytest.mark.slow

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, seconds: float = 90, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server behind {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up in {seconds} s")


def test_dvc_remote_push_then_pull_in_a_fresh_clone(tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj")
    use_project(project, monkeypatch)
    dvc = [sys.executable, "-m", "dvc"]
    run_cmd(dvc + ["repro", "ingest"], project)
    run_cmd(dvc + ["remote", "add", "-d", "store", str(tmp_path / "remote")], project)
    run_cmd(["git", "add", "-A"], project)
    run_cmd(["git", "commit", "-qm", "ingest + remote"], project)
    run_cmd(dvc + ["push"], project)

    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run_cmd(dvc + ["pull", "ingest"], clone)
    for name in ("images.npy", "manifest.csv", "meta.json"):
        assert (clone / "data/prepared" / name).read_bytes() == (project / "data/prepared" / name).read_bytes()
    assert "up to date" in run_cmd(dvc + ["status", "ingest"], clone).stdout.lower()


@pytest.fixture()
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1, from Debian's postgresql package."""
    import tempfile

    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql-15)")
    # Not under pytest's tmp_path: that is private to root, and PostgreSQL refuses to run as root.
    base = Path(tempfile.mkdtemp(prefix="sslpipe-pg-"))
    data = base / "pgdata"
    data.mkdir()
    port = _free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        for path in (base, data):
            shutil.chown(path, "postgres")
    pg_ctl = [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data)]
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*pg_ctl, "-l", str(base / "pg.log"), "-w",
                    "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        subprocess.run([*as_postgres, "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                        "CREATE DATABASE mlflow"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_stages_log_to_an_mlflow_server_backed_by_postgres(tmp_path, postgres, monkeypatch):
    pytest.importorskip("psycopg2")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "mlflow.log", "w"))
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", seconds=120, process=server)
        project = make_project(tmp_path / "proj")
        use_project(project, monkeypatch)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        run_cmd([sys.executable, "-m", "dvc", "repro", "ingest"], project)

        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("ssl-pipeline")
        runs = client.search_runs([experiment.experiment_id])
        stage = next(r for r in runs if r.data.tags.get("sslpipe.stage") == "ingest")
        assert stage.data.metrics["num_images"] == 1797
        assert any(r.info.run_id == stage.data.tags["mlflow.parentRunId"] for r in runs)
        assert {a.path for a in client.list_artifacts(stage.info.run_id)} >= {"meta.json", "report.json"}
        assert not (project / "mlflow.db").exists()  # nothing went to the local SQLite store
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_process_worker_runs_the_pipeline_deployment(tmp_path, prefect_server, monkeypatch):
    """Deploy the pipeline flow to a process work pool; a real worker picks the run up and completes it."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    project = make_project(tmp_path / "proj", {"pretrain": {"epochs": 1}, "finetune": {"epochs": 2}})
    use_project(project, monkeypatch)
    pool = "test-process-pool"
    api_url = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api_url,
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"],
                   env=env, check=True, capture_output=True)
    pipeline = flow.from_source(source=str(REPO), entrypoint="flows/pipeline.py:ssl_pipeline")
    deployment_id = pipeline.deploy(name="test-pipeline", work_pool_name=pool, build=False, push=False,
                                    parameters={"root": str(project), "save_experiment": False},
                                    print_next_steps=False)
    flow_run = run_deployment(deployment_id, timeout=0)
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
                            env=env, capture_output=True, text=True, timeout=600)

    import anyio

    async def _state():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state

    state = anyio.run(_state)
    assert state.is_completed(), f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    assert (project / "results/metrics.json").is_file()
