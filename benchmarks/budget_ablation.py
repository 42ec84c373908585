"""Accuracy against minutes for the recipe's compute knobs, judged on dev: how the budgets and caps were chosen.

Dev is the unlabeled pool's hidden labels (those images enter self-training unlabeled; the test split is never
read). A config is a set of params overrides beside params.yaml. The passes caps (``max_epochs``) bind on small
pools only (Fashion-MNIST's pool takes 5 and 2 passes), so they are varied on digits, the colour shapes folder and
the 5 000-image folder; the image budgets (``images_seen``) decide Fashion-MNIST's compute. Per shape and
pretraining config, one encoder (seed 0); per seed, every row as the stages train it
(``benchmarks/label_efficiency.run_point``), 10 labels per class.

    .venv/bin/python benchmarks/budget_ablation.py                    # the table in benchmarks/results/
    .venv/bin/python benchmarks/budget_ablation.py --shapes digits --seeds 0
    .venv/bin/python benchmarks/budget_ablation.py --shapes fashion-mnist \
        --configs "pretrain.images_seen=300000,self_train.images_seen=240000;pretrain.images_seen=200000"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.generality import LABELS_PER_CLASS, shape_params
from benchmarks.label_efficiency import run_point
from ssl_lib.config import apply_overrides, parse_params, read_raw_params
from ssl_lib.data.ingest import ingest
from ssl_lib.data.prepared import load_prepared
from ssl_lib.io import atomic_path
from ssl_lib.pretrain import pretrain
from ssl_lib.pretrain_plan import PretrainSettings, make_pseudo_labels

# The caps as first chosen, (100, 20), then each cap halved and doubled alone.
CONFIGS: tuple[dict[str, int], ...] = tuple(
    {"pretrain.max_epochs": pre, "self_train.max_epochs": st} for pre, st in ((100, 20), (50, 20), (200, 20),
                                                                              (100, 10), (100, 40)))


def parse_configs(text: str) -> tuple[dict[str, int], ...]:
    """``"a.b=1,c.d=2;a.b=3"`` -> ({"a.b": 1, "c.d": 2}, {"a.b": 3}): configs split by ';', overrides by ','."""
    configs = []
    for config in text.split(";"):
        pairs = [pair.split("=", 1) for pair in config.split(",") if pair.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit(f"--configs: each override is key=value, got {config!r}")
        configs.append({key.strip(): int(value) for key, value in pairs})
    return tuple(configs)


def config_of(point: dict) -> dict[str, int]:
    """A point's overrides; points measured before configs were recorded carry the two caps."""
    if "config" in point:
        return point["config"]
    return {"pretrain.max_epochs": point["pretrain_max_epochs"],
            "self_train.max_epochs": point["self_train_max_epochs"]}


def run(shape: str, seeds: list[int], base: dict, work: Path,
        configs: tuple[dict[str, int], ...] = CONFIGS) -> Iterator[dict]:
    """Each seed's point of each config, as soon as it is measured (a long run keeps what it finished)."""
    params0 = shape_params(shape, work, base)
    prepared = work / f"{shape}-pool"
    ingest(params0.data.source, params0.data.path, 0, labels_per_class=LABELS_PER_CLASS, label_fraction=None,
           val_per_class=params0.data.val_per_class, test_fraction=params0.data.test_fraction, out_dir=prepared)
    data = load_prepared(prepared)
    pool = data.pretrain_pool()
    encoders: dict[tuple, tuple[dict, float]] = {}
    for config in configs:
        params = parse_params(apply_overrides(params0.model_dump(mode="json"), dict(config)))
        # Configs that pretrain alike share one encoder.
        pretrain_key = tuple(sorted((k, v) for k, v in config.items() if k.startswith("pretrain.")))
        if pretrain_key not in encoders:
            settings = replace(PretrainSettings.from_params(params, len(pool)), seed=0)
            start = time.perf_counter()
            state = pretrain(pool, data.meta["mean"], data.meta["std"], make_pseudo_labels(settings, len(pool)),
                             settings, progress=False).encoder_state
            encoders[pretrain_key] = (state, time.perf_counter() - start)
        encoder, pretrain_s = encoders[pretrain_key]
        for seed in seeds:
            point = run_point(params, encoder, seed, LABELS_PER_CLASS, False, work)
            point.update(shape=shape, config=config, pretrain_s=pretrain_s)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()
                   if not k.startswith("ssl_semi_") or k.endswith(("_dev", "_s", "_final"))}, flush=True)
            yield point


def _config_text(config: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in config.items())


def summarize(points: list[dict]) -> str:
    lines = ["| shape | config (beside params.yaml) | SSL fine-tune, dev | final model, dev "
             "| final model, val | minutes: pretrain + self-train |", "|---|---|---|---|---|---|"]
    keys: list[tuple[str, str]] = []  # in the order first measured
    for point in points:
        key = (point["shape"], _config_text(config_of(point)))
        if key not in keys:
            keys.append(key)
    for shape, config in sorted(keys, key=lambda k: k[0]):
        rows = [p for p in points if (p["shape"], _config_text(config_of(p))) == (shape, config)]

        def cell(key: str, rows: list[dict] = rows) -> str:
            values = [p[key] for p in rows if key in p]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.4f} ± {std:.4f}"

        final_val = [max(v for k, v in p.items() if k.startswith("ssl_semi_") and k.endswith("_val"))
                     for p in rows]
        minutes = f"{rows[0]['pretrain_s'] / 60:.1f} + {statistics.fmean(p['ssl_semi_s'] for p in rows) / 60:.1f}"
        lines.append(f"| {shape} (n={len(rows)}) | {config} | {cell('ssl_dev')} | {cell('ssl_semi_dev')} | "
                     f"{statistics.fmean(final_val):.4f} | {minutes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="digits,shapes-colour")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--points", default="benchmarks/results/budget_ablation_points.jsonl")
    parser.add_argument("--out", default="benchmarks/results/budget_ablation.md")
    parser.add_argument("--configs", default=";".join(",".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS),
                        help="params overrides: key=value pairs split by ',', configs split by ';'")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    configs = parse_configs(args.configs)
    torch.set_num_threads(int(os.environ.get("SSLPIPE_THREADS", torch.get_num_threads())))
    base = read_raw_params(args.params)
    points_file = Path(args.points)
    if not args.table_only:
        with tempfile.TemporaryDirectory() as tmp:
            for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
                for point in run(shape, [int(s) for s in args.seeds.split(",")], base, Path(tmp), configs):
                    with points_file.open("a") as fh:
                        fh.write(json.dumps(point) + "\n")
    points = [json.loads(line) for line in points_file.read_text().splitlines() if line.strip()]
    table = summarize(points)
    print(table)
    with atomic_path(args.out) as tmp_path:
        Path(tmp_path).write_text(table + "\n")


if __name__ == "__main__":
    main()
