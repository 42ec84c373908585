"""A stage run by the warm stage server (``tasks.stage_server``) is the stage run alone: same outputs, same exit
status, same output on the same pipes, and killing the stage's process kills the stage. Real processes: a
server of this module's own, and ``python -m tasks.<stage>`` in a tiny git + DVC project."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import stage_server
from tests.helpers import REPO

PREPARED = ("images.npy", "manifest.csv", "meta.json", "pool_indices.npy", "lineage.json", "report.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """A server of this module's own (not the session's), so that these tests see a fresh one start."""
    address = str(tmp_path_factory.mktemp("srv") / "s.sock")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc, listening = stage_server.start(address, env, str(REPO))
    assert listening, "the stage server did not start listening"
    yield address
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert not Path(address).exists()


def _stage(project: Path, module: str, address: str, report: Path | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, stage_server.SERVER_ENV: address}
    if report is not None:
        env["SSLPIPE_STAGE_REPORT"] = str(report)
    return subprocess.Popen([sys.executable, "-m", module], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _run(project: Path, module: str, address: str, report: Path | None = None) -> subprocess.CompletedProcess:
    proc = _stage(project, module, address, report)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in PREPARED}


def _replace_run(project: Path, module: str, body: str) -> None:
    """Make the project's own copy of ``tasks/<module>.py`` (the code the stage runs) start with ``body``."""
    stage = project / f"tasks/{module}.py"
    head, sep, rest = stage.read_text().partition("def run(params: PipelineParams)")
    assert sep, f"tasks/{module}.py no longer defines run(params); update this test"
    signature, newline, rest = rest.partition("\n")
    stage.write_text(f"{head}{sep}{signature}{newline}{body}{rest}")


def test_a_stage_run_by_the_server_writes_what_it_writes_alone(project: Path, server: str, tmp_path: Path):
    assert _run(project, "tasks.fingerprint", stage_server.DISABLED).returncode == 0
    alone = _run(project, "tasks.ingest", stage_server.DISABLED, tmp_path / "alone.json")
    assert alone.returncode == 0, alone.stderr
    expected = _digests(project / "data/prepared")
    subprocess.run(["rm", "-rf", str(project / "data/prepared")], check=True)
    warm = _run(project, "tasks.ingest", server, tmp_path / "warm.json")
    assert warm.returncode == 0, warm.stderr
    assert _digests(project / "data/prepared") == expected
    assert "ingested 1797 images from digits" in warm.stderr  # the stage's log, on the stage process's stderr
    alone_report, warm_report = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("alone", "warm"))
    assert not alone_report["stage_server"] and warm_report["stage_server"]
    # Start-up counts from the stage process DVC started, not from the fork.
    assert warm_report["process_started"] < warm_report["work_started"] <= warm_report["work_ended"]


def test_exit_status_user_errors_and_tracebacks_pass_through(project: Path, server: str):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("labels_per_class: 5", "labels_per_class: 500"))
    assert _run(project, "tasks.fingerprint", server).returncode == 0
    mistake = _run(project, "tasks.ingest", server)
    assert mistake.returncode == 2
    assert "sslpipe ingest: error:" in mistake.stderr and "Traceback" not in mistake.stderr
    params.write_text(params.read_text().replace("labels_per_class: 500", "labels_per_class: 5"))
    # The child imports the project's own (edited) code, not a copy the server holds.
    _replace_run(project, "ingest", "    raise ZeroDivisionError('a bug in the ingest stage')\n")
    bug = _run(project, "tasks.ingest", server)
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and "ZeroDivisionError: a bug in the ingest stage" in bug.stderr


def _gone(pid: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_stopping_the_stage_process_stops_the_stage(project: Path, server: str, how: signal.Signals):
    _replace_run(project, "pseudo_labels",
                 "    import os, time\n    print(os.getpid(), flush=True)\n    time.sleep(300)\n")
    proc = _stage(project, "tasks.pseudo_labels", server)
    child = int(proc.stdout.readline())  # the stage's own stdout, through the stage process's pipe
    assert child != proc.pid  # it runs in the server's child
    proc.send_signal(how)
    assert proc.wait(timeout=30) == (-signal.SIGKILL if how == signal.SIGKILL else 128 + signal.SIGTERM)
    assert _gone(child), "the stage kept running after its process was stopped"


def test_without_a_reachable_server_the_stage_runs_in_its_own_process(project: Path, tmp_path: Path):
    assert _run(project, "tasks.fingerprint", stage_server.DISABLED).returncode == 0
    out = _run(project, "tasks.ingest", str(tmp_path / "no-such.sock"), tmp_path / "report.json")
    assert out.returncode == 0, out.stderr
    assert "unreachable" in out.stderr and "running the stage in this process" in out.stderr
    assert not json.loads((tmp_path / "report.json").read_text())["stage_server"]


def test_a_flow_starts_a_server_for_its_stages_and_stops_it(project: Path, monkeypatch):
    from flows.stages import run_dvc_stage
    from flows.stages import stage_server as serving

    monkeypatch.delenv(stage_server.SERVER_ENV, raising=False)  # not the session's: this flow starts its own
    with serving(project) as env:
        address = env[stage_server.SERVER_ENV]
        assert Path(address).exists()
        assert run_dvc_stage("ingest", project, env, echo=lambda line: None).stage_server
    assert not Path(address).exists()  # stopped with the block
    monkeypatch.setenv(stage_server.SERVER_ENV, stage_server.DISABLED)
    with serving(project) as env:
        assert env == {}


def test_a_stage_process_without_stdin_still_hands_its_stage_over(project: Path, server: str, tmp_path: Path):
    env = {**os.environ, stage_server.SERVER_ENV: server, "SSLPIPE_STAGE_REPORT": str(tmp_path / "report.json")}
    # As a daemon's child may be: file descriptor 0 closed (the server gets /dev/null in its place).
    out = subprocess.run([sys.executable, "-m", "tasks.fingerprint"], cwd=project, env=env, capture_output=True,
                         text=True, preexec_fn=lambda: os.close(0))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "report.json").read_text())["stage_server"]


def test_dvc_runs_in_the_server_and_its_stages_too(project: Path, server: str, tmp_path: Path):
    """``python -m tasks.dvc_cli`` (a flow's `dvc repro`): DVC runs in a child of the server, the stage processes
    it starts are handed to the server in turn, and what DVC prints, writes and exits with is what it does alone."""
    import psutil

    server_pid = next(p.pid for p in psutil.process_iter(["cmdline"]) if address_in(p, server))
    _replace_run(project, "ingest", "    import psutil\n    from tasks import stage_server\n"
                 "    print('dvc ran in', [p.pid for p in psutil.Process(stage_server.stage_process_id()).parents()],"
                 " flush=True)\n")

    def dvc(*args: str, report: Path | None = None) -> subprocess.CompletedProcess:
        from flows.stages import subprocess_env

        env = subprocess_env({stage_server.SERVER_ENV: server, **({"SSLPIPE_STAGE_REPORT": str(report)} if report
                                                                   else {})})
        return subprocess.run([sys.executable, "-m", "tasks.dvc_cli", *args], cwd=project, env=env, text=True,
                              capture_output=True, timeout=300)

    ran = dvc("repro", "ingest", report=tmp_path / "report.json")
    assert ran.returncode == 0, ran.stderr
    assert "Running stage 'ingest'" in ran.stdout
    assert f"{server_pid}" in next(line for line in ran.stdout.splitlines() if line.startswith("dvc ran in"))
    assert json.loads((tmp_path / "report.json").read_text())["stage_server"]  # the stage was handed over too
    assert "ingest" in (project / "dvc.lock").read_text()
    again = dvc("repro", "ingest")
    assert again.returncode == 0 and "Running stage 'ingest'" not in again.stdout, again.stdout
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "ingest"], cwd=project, text=True,
                            capture_output=True)
    assert "ingest:" not in status.stdout, status.stdout  # DVC alone agrees: what the warm DVC recorded is true
    unknown = dvc("repro", "no_such_stage")
    alone = subprocess.run([sys.executable, "-m", "dvc", "repro", "no_such_stage"], cwd=project, text=True,
                           capture_output=True)
    assert unknown.returncode == alone.returncode != 0
    assert "no_such_stage" in unknown.stderr


def address_in(process, address: str) -> bool:
    return address in (process.info.get("cmdline") or [])
