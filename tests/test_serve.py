"""`make serve` on any port: the Prefect UI it starts calls that port's API, not 4200's."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def test_the_prefect_ui_of_a_server_on_another_port_calls_that_port(tmp_path: Path):
    port = _free_port()
    assert port != 4200
    # As a user's shell may have it: a client setting naming another server, which the UI must not follow.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:4200/api", "PREFECT_HOME": str(tmp_path / "prefect")}
    # The Makefile's own recipe (the server part of `make serve`), with this interpreter's tools.
    server = subprocess.Popen(["make", "-s", "-C", str(REPO), "prefect-server", f"PREFECT_PORT={port}",
                               f"BIN={Path(sys.executable).parent}", f"PYTHON={sys.executable}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _get_json(f"http://127.0.0.1:{port}/api/health")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
                assert time.monotonic() < deadline, "the server did not answer within 120 s"
                time.sleep(1)
        settings = _get_json(f"http://127.0.0.1:{port}/ui-settings")
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api", settings
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # make and the server it started: their own session
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
