"""The benchmark scripts run end to end (tiny settings) and print the tables they promise."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _table_rows(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


@pytest.mark.skipif(not FASHION_TRAIN.exists(), reason="apt-get install dataset-fashion-mnist")
def test_throughput_quick(tmp_path):
    # Without lightly (pip install -e '.[bench]') the script measures ours alone.
    lightly = importlib.util.find_spec("lightly") is not None
    out_file = tmp_path / "throughput.md"
    # One thread: a loaded CI machine makes two spinning OpenMP threads many times slower.
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--threads", "1",
                           "--methods", "simclr,byol", "--out", str(out_file)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    implementations = ["ours", "lightly (workers=0)"] if lightly else ["ours"]
    assert {(r["method"], r["implementation"]) for r in rows} == {
        (method, impl) for method in ("simclr", "byol") for impl in implementations}
    assert re.search(r"ours: (fp32|bf16|fp16), channels_last (True|False), compile (True|False)", proc.stdout)
    for row in rows:
        assert row["model"] == "convnet"
        assert float(row["images/s (median)"]) > 0
        assert float(row["s/step data+aug"]) > 0 and float(row["s/step fwd+bwd+opt"]) > 0
        assert float(row["peak MB"]) > 0
        if row["implementation"] == "ours":
            assert row["ours / this"] == ""
        else:
            assert re.fullmatch(r"\d+\.\d\dx", row["ours / this"]), row
    assert out_file.read_text().count("| convnet |") == len(rows) == 2 * len(implementations)
