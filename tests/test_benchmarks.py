"""The benchmark scripts run end to end (tiny settings) and print the tables they promise."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _tables(stdout: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``stdout`` (a block of lines starting with "|"), as rows keyed by the header."""
    blocks: list[list[str]] = [[]]
    for line in stdout.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    tables = []
    for lines in (block for block in blocks if block):
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        tables.append([dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
                       for line in lines[2:]])
    return tables


def _table_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the first table in ``stdout``."""
    return _tables(stdout)[0]


@pytest.mark.skipif(not FASHION_TRAIN.exists(), reason="apt-get install dataset-fashion-mnist")
def test_throughput_quick(tmp_path):
    # Without lightly (pip install -e '.[bench]') the script measures ours alone.
    lightly = importlib.util.find_spec("lightly") is not None
    out_file = tmp_path / "throughput.md"
    # One thread: a loaded CI machine makes two spinning OpenMP threads many times slower.
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--threads", "1",
                           "--methods", "simclr,byol", "--variants", "contiguous", "--out", str(out_file)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    implementations = ["ours", "ours (contiguous)"] + (["lightly (workers=0)"] if lightly else [])
    assert {(r["method"], r["implementation"]) for r in rows} == {
        (method, impl) for method in ("simclr", "byol") for impl in implementations}
    assert re.search(r"ours: (fp32|bf16|fp16), channels_last (True|False), compile (True|False)", proc.stdout)
    assert re.search(r"^peak: \d+\.\d GFLOP/s", proc.stdout, re.MULTILINE)
    for row in rows:
        assert row["model"] == "convnet"
        assert float(row["images/s (median)"]) > 0
        assert float(row["s/step data+aug"]) > 0 and float(row["s/step fwd+bwd+opt"]) > 0
        assert float(row["peak MB"]) > 0
        assert float(row["GFLOP/step"]) > 0 and float(row["GFLOP/s"]) > 0
        assert 0 < float(row["% of peak"].rstrip("%")) / 100 <= 1, row
        if row["implementation"] == "ours":
            assert row["ours / this"] == ""
        else:
            assert re.fullmatch(r"\d+\.\d\dx", row["ours / this"]), row
    # The same model and method: the same FLOPs, whichever implementation or memory layout runs them.
    for method in ("simclr", "byol"):
        assert len({r["GFLOP/step"] for r in rows if r["method"] == method}) == 1
    written = out_file.read_text()
    assert "| GFLOP/step | GFLOP/s | % of peak |" in written
    assert written.count("| convnet |") == len(rows) == 2 * len(implementations)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_throughput_on_cuda_without_a_gpu_fails_in_one_line():
    # What `make bench-gpu` shows on a machine without a GPU.
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--device", "cuda", "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "CUDA is not available" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # 20-55 s of compiling on 2 cores (less with inductor's on-disk cache): not in make test-fast
def test_compiled_and_eager_steps_agree_on_the_loss():
    """torch.compile (inductor, the machine's C++ compiler) changes the speed of our step, not what it learns:
    three BYOL steps (online encoder compiled, EMA target eager) give the eager losses within float tolerance.
    Compile reorders float operations, so not bit for bit: the last bits of a gradient near 0 can flip the sign
    of AdamW's first updates, which moved the step-2 loss by 6e-5 relative here; 1e-3 leaves room for that and is
    still far below one step's change of the loss (about 5e-2)."""
    from dataclasses import replace

    from ssl_lib.acceleration import resolve_acceleration
    from ssl_lib.augment import nhwc_to_tensor
    from ssl_lib.engine import build_model, make_engine, train_step
    from tests.engine_worker import digits_uint8

    cpu = torch.device("cpu")
    images = nhwc_to_tensor(digits_uint8()[:96]).float().div_(255.0)

    def losses(accel) -> list[float]:
        model, _, _ = build_model("byol", "convnet_small", {}, [0.3], [0.35], 1, 8, 0, cpu, accel)
        engine = make_engine(model, accel, cpu, 3, "adamw", 1e-3, 1e-4, 0.05)
        generator = torch.Generator().manual_seed(0)
        return [float(train_step(engine, images[32 * i:32 * (i + 1)], {}, generator, i).detach()) for i in range(3)]

    eager = resolve_acceleration(cpu, "fp32", channels_last=True, compile=False)
    assert losses(replace(eager, compile=True)) == pytest.approx(losses(eager), rel=1e-3)


def test_throughput_steps_can_be_given_per_model():
    # docs/performance.md's command times ResNet-18 (~10 s a step on 2 cores) for fewer steps than the ConvNet.
    from benchmarks.throughput import DEFAULT_STEPS, parse_args, steps_for

    def steps(*argv: str) -> dict[str, tuple[int, int]]:
        args = parse_args(list(argv))
        return {model: steps_for(model, args.warmup, args.steps) for model in ("convnet", "resnet18")}

    assert steps() == {model: DEFAULT_STEPS[model] for model in ("convnet", "resnet18")}
    assert steps("--steps", "convnet=10,resnet18=2") == {"convnet": (3, 10), "resnet18": (1, 2)}
    assert steps("--steps", "4", "--warmup", "resnet18=2") == {"convnet": (3, 4), "resnet18": (2, 4)}
    with pytest.raises(SystemExit):
        parse_args(["--steps", "resnet18=two"])


def test_generality_quick_on_digits(tmp_path):
    """The generality script trains every row on one shape and prints its table: test accuracies for each row,
    whether the final model beat the baseline and the SSL fine-tune, the candidate chosen and the minutes."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pretrain"].update(backbone="convnet_small", images_seen=3_000)
    raw["finetune"].update(epochs=4, lp_epochs=2)
    raw["self_train"].update(images_seen=3_000)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "benchmarks/generality.py", "--shapes", "digits", "--seeds", "0",
                           "--params", str(params), "--points", str(tmp_path / "points.jsonl"),
                           "--out", str(tmp_path / "generality.md")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    assert len(rows) == 1 and rows[0]["shape"].startswith("digits")
    for column in ("supervised-only baseline", "SSL fine-tune", "SSL + semi-supervised (final)",
                   "semi-supervised from scratch"):
        assert re.match(r"0\.\d{4} ± 0\.0000<br>0\.\d{4}$", rows[0][column]), rows[0]
    assert rows[0]["final model chosen"] in ("fine-tune", "round 1", "round 2")
    # The per-candidate table: val / dev / test for each, the rule's choice (the same as above) and dev's best.
    (candidate,), = _tables(proc.stdout)[1:]
    assert candidate["rule's choice (val)"] == rows[0]["final model chosen"]
    assert candidate["dev's best"] in ("fine-tune", "round 1", "round 2")
    for name in ("fine-tune", "round 1", "round 2"):
        assert re.fullmatch(r"(0\.\d{4}|1\.0000) / (0\.\d{4}|1\.0000) / (0\.\d{4}|1\.0000)",
                            candidate[f"{name}: val / dev / test"]), candidate
    assert (tmp_path / "generality.md").read_text().startswith("Measured ")


def test_the_colour_shapes_folder_has_one_folder_per_class_of_distinct_shapes(tmp_path):
    import numpy as np
    from PIL import Image

    from benchmarks.shapes import CLASSES, _inside, write_folder

    grid = np.arange(64) - 31.5
    x, y = np.meshgrid(grid, grid)
    masks = {shape: _inside(shape, x, y, 24.0, 0.3) for shape in CLASSES}
    for a in CLASSES:
        for b in CLASSES:
            if a < b:  # at the same place, size and angle, two classes cover different pixels
                assert (masks[a] != masks[b]).mean() > 0.05, (a, b)
    root = write_folder(tmp_path / "shapes", per_class=2, size=32, seed=1)
    for shape in CLASSES:
        files = sorted((root / shape).glob("*.png"))
        assert len(files) == 2
        assert np.asarray(Image.open(files[0])).shape == (32, 32, 3)


def test_stage_table_columns_add_up_on_synthetic_records():
    """The stage table's join and formatting, on records made up here (no run, no torch): each row's steps and
    outside time add up to its wall, its parts and ``other`` to the outside time, the total row sums the rows, and
    the FLOP rates are the counted FLOPs over the steps' seconds, against the peak of the steps' precision."""
    from benchmarks.stage_table import COLUMNS, OVERHEAD, PART_KEYS, TOTAL, StageRecord, markdown_table, table_rows

    records = [
        StageRecord("ingest", 12.0, parts={"data": 3.0, "startup": 8.5}),
        StageRecord("pretrain", 300.0, steps=2340, step_seconds=280.0, flops=2340 * 10e9,
                    parts={"data": 2.5, "loop": 1.0, "startup": 3.0}),
        StageRecord("finetune", 25.0, steps=600, step_seconds=None, parts={"startup": 2.0},
                    notes=["recorded before the training loops timed their steps"]),
        StageRecord("self_train", 220.0, steps=1100, step_seconds=150.0, flops=1100 * 8e9, precision="bf16",
                    parts={"data": 20.0, "targets": 15.0, "ema": 5.0, "bn": 10.0, "eval": 2.0, "startup": 2.0}),
        StageRecord("evaluate", 23.0, executed=False, parts={"startup": 23.0}),
        StageRecord(OVERHEAD, 30.0, parts={"startup": 12.0}),
    ]
    peaks = {"fp32": 200e9, "bf16": 400e9}
    rows = table_rows(records, peaks)
    assert [row["stage"] for row in rows] == ["ingest", "pretrain", "finetune", "self_train", "evaluate (up to date)",
                                              OVERHEAD, TOTAL]
    for row in rows:
        assert (row["step_seconds"] or 0.0) + row["outside"] == pytest.approx(row["wall"]), row
        parts = sum(row[key] or 0.0 for key in PART_KEYS)
        assert parts + row["other"] == pytest.approx(row["outside"]), row
    total = rows[-1]
    for key in ("wall", "step_seconds", "outside", "other", *PART_KEYS):
        assert total[key] == pytest.approx(sum(row[key] or 0.0 for row in rows[:-1])), key
    assert total["wall"] == pytest.approx(610.0)
    pretrain, self_train = rows[1], rows[3]
    assert pretrain["other"] == pytest.approx(300.0 - 280.0 - 6.5)
    assert pretrain["gflop_step"] == pytest.approx(10.0)
    assert pretrain["gflop_s"] == pytest.approx(2340 * 10 / 280.0)
    assert pretrain["peak_share"] == pytest.approx(2340 * 10e9 / 280.0 / 200e9)
    assert self_train["peak_share"] == pytest.approx(1100 * 8e9 / 150.0 / 400e9)  # its own precision's peak
    assert "peak_share" not in total  # two precisions: no one peak to set the total against
    assert total["gflop_s"] == pytest.approx((2340 * 10 + 1100 * 8) / (280.0 + 150.0))

    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    cells = {row["stage"]: row for row in _table_rows(table)}
    assert cells["pretrain"]["% of peak"] == "41.8%" and cells["pretrain"]["GFLOP/step"] == "10.00"
    assert cells["finetune"]["steps s"] == "n/a" and cells["finetune"]["GFLOP/s"] == ""  # not recorded: not guessed
    assert cells["ingest"]["steps"] == "" and cells["ingest"]["EMA"] == ""  # a part the stage has not: blank
    assert cells[TOTAL]["wall s"] == "610.0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_stage_table_on_cuda_without_a_gpu_fails_in_one_line():
    # What `make bench-gpu-stages` shows on a machine without a GPU, before it runs anything.
    proc = subprocess.run([sys.executable, "benchmarks/stage_table.py", "--run", "--device", "cuda", "--out", ""],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "CUDA is not available" in proc.stderr.strip().splitlines()[-1]


def test_budget_ablation_configs_are_params_overrides_and_old_points_keep_their_caps():
    from benchmarks.budget_ablation import CONFIGS, config_of, parse_configs, summarize

    assert parse_configs("pretrain.images_seen=200000,self_train.images_seen=160000;self_train.rounds=1") == (
        {"pretrain.images_seen": 200000, "self_train.images_seen": 160000}, {"self_train.rounds": 1})
    with pytest.raises(SystemExit, match="key=value"):
        parse_configs("pretrain.images_seen")
    assert config_of({"pretrain_max_epochs": 100, "self_train_max_epochs": 40}) == CONFIGS[-1]
    point = {"ssl_dev": 0.7, "ssl_semi_dev": 0.8, "ssl_semi_round_1_val": 0.75, "ssl_semi_s": 60.0,
             "pretrain_s": 120.0}
    table = summarize([{**point, "shape": "fashion-mnist", "seed": s, "config": {"pretrain.images_seen": 200000}}
                       for s in (0, 1)] + [{**point, "shape": "digits", "seed": 0, "pretrain_max_epochs": 100,
                                            "self_train_max_epochs": 20}])
    assert "| fashion-mnist (n=2) | pretrain.images_seen 200000 | 0.7000 ± 0.0000 | 0.8000 ± 0.0000" in table
    assert "| digits (n=1) | pretrain.max_epochs 100, self_train.max_epochs 20 |" in table
