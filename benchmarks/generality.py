"""Generality: the committed recipe (params.yaml) on data shapes it was not tuned on, 10 labels per class.

Shapes (each made here, from data on this machine):
- ``fashion-mnist``: 70 000 28x28 grey images (Debian's dataset-fashion-mnist; 10 000 of them are the test split);
- ``folder-5000``: 5 000 28x28 grey PNGs in one folder per class, written from Fashion-MNIST's *test* images
  (500 per class: images the defaults were never chosen on), read as a user's folder;
- ``digits``: scikit-learn's 1 797 8x8 digits;
- ``shapes-colour``: 3 000 32x32 colour PNGs of eight shape classes (``benchmarks/shapes.py``).

Per shape, one encoder is pretrained (seed 0; pretraining sees no labels), then every seed draws its labels and
trains every row exactly as the stages do (``benchmarks/label_efficiency.run_point``): the supervised-only
baseline, the SSL fine-tune, SSL + semi-supervised (the final model, chosen on val among the fine-tune and each
self-training round) and semi-supervised from scratch (the same self-training from the baseline). Minutes are
wall-clock on this machine: pretraining once, then fine-tuning both models and self-training, per seed; the
plan's estimate (``ssl_lib.plan``, from its probe) stands next to them.

    .venv/bin/python benchmarks/generality.py                        # every shape x seeds 0, 1, 2
    .venv/bin/python benchmarks/generality.py --shapes digits --seeds 0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.label_efficiency import run_point
from benchmarks.machine import machine
from benchmarks.shapes import write_folder as write_shapes_folder
from ssl_lib.config import apply_overrides, parse_params, read_raw_params
from ssl_lib.data.ingest import ingest
from ssl_lib.data.prepared import load_prepared
from ssl_lib.io import atomic_path
from ssl_lib.plan import DataShape, make_plan, probe
from ssl_lib.pretrain import pretrain
from ssl_lib.pretrain_plan import PretrainSettings, make_pseudo_labels
from ssl_lib.self_train import choose_final

SHAPES = ("fashion-mnist", "folder-5000", "digits", "shapes-colour")
ROWS = {"baseline": "supervised-only baseline", "ssl": "SSL fine-tune", "ssl_semi": "SSL + semi-supervised (final)",
        "scratch_semi": "semi-supervised from scratch"}
LABELS_PER_CLASS = 10


def write_fashion_folder(root: Path, per_class: int = 500) -> Path:
    """``per_class`` of Fashion-MNIST's test images per class as PNGs, one folder per class."""
    from PIL import Image

    from ssl_lib.data.sources import load_fashion_mnist

    raw = load_fashion_mnist()
    test = np.flatnonzero(raw.predefined_test)
    for c, name in enumerate(raw.class_names):
        folder = root / name.replace("/", "-").replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        members = test[raw.labels[test] == c][:per_class]
        for i, row in enumerate(members):
            Image.fromarray(raw.images[row][..., 0]).save(folder / f"{i:04d}.png")
    return root


def shape_params(shape: str, work: Path, base: dict):
    """params.yaml with only the source changed, as a new user would run it."""
    if shape == "fashion-mnist":
        data = {"data.source": "fashion-mnist"}
    elif shape == "digits":
        data = {"data.source": "digits"}
    elif shape == "folder-5000":
        data = {"data.source": "folder", "data.path": str(write_fashion_folder(work / "folder-5000"))}
    elif shape == "shapes-colour":
        data = {"data.source": "folder", "data.path": str(write_shapes_folder(work / "shapes-colour", 375))}
    else:
        raise SystemExit(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    return parse_params(apply_overrides(base, data), origin=f"params.yaml with {data}")


def data_shape(data) -> DataShape:
    height, width, channels = data.meta["shape"]
    return DataShape.from_splits(data.manifest["split"].to_numpy(), len(data.class_names), height, width, channels)


def run_shape(shape: str, seeds: list[int], base: dict, work: Path) -> list[dict]:
    params = shape_params(shape, work, base)
    prepared = work / f"{shape}-pool"
    ingest(params.data.source, params.data.path, 0, labels_per_class=LABELS_PER_CLASS, label_fraction=None,
           val_per_class=params.data.val_per_class, test_fraction=params.data.test_fraction, out_dir=prepared)
    data = load_prepared(prepared)
    plan = probe(make_plan(params, data_shape(data)), params)
    pool = data.pretrain_pool()
    settings = replace(PretrainSettings.from_params(params, len(pool)), seed=0)
    start = time.perf_counter()
    encoder = pretrain(pool, data.meta["mean"], data.meta["std"], make_pseudo_labels(settings, len(pool)), settings,
                       progress=False).encoder_state
    pretrain_s = time.perf_counter() - start
    print(f"{shape}: pretrained {settings.epochs} epochs at batch {settings.batch_size} in {pretrain_s:.0f} s "
          f"(planned {plan.stage('pretrain').seconds:.0f} s)", flush=True)
    results = []
    for seed in seeds:
        point = run_point(params, encoder, seed, LABELS_PER_CLASS, True, work)
        point.update(shape=shape, pretrain_s=pretrain_s, pretrain_epochs=settings.epochs,
                     planned_pretrain_s=plan.stage("pretrain").seconds,
                     planned_finetune_s=plan.stage("finetune").seconds,
                     planned_self_train_s=plan.stage("self_train").seconds,
                     self_train_epochs=plan.stage("self_train").epochs,
                     self_train_max_epochs=params.self_train.max_epochs, image_shape=list(data.meta["shape"]),
                     pool=len(pool), classes=len(data.class_names))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()}, flush=True)
        results.append(point)
    return results


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


# Each semi-supervised row's teacher: the fine-tuned model its "fine_tune" candidate is.
TEACHERS = {"ssl_semi": "ssl", "scratch_semi": "baseline"}


def apply_rule(point: dict, margin: float) -> dict:
    """``point`` with each semi-supervised row's final model chosen by ``choose_final`` from the candidates' recorded
    val accuracies and the fine-tune's val optimism (each candidate's test accuracy is recorded too, never used to
    choose): the table always shows the committed rule, whichever rule ran when the point was measured."""
    point = dict(point)
    for kind in TEACHERS:
        names = _candidates(point, kind, "val")
        if "fine_tune" not in names or len(names) < 2:
            continue
        chosen = names[choose_final(_rule_scores(point, kind, names), margin)]
        point[kind] = point[f"{kind}_{chosen}_test"]
        point[f"{kind}_final"] = _candidate_label(chosen)
    return point


def summarize(points: list[dict]) -> str:
    """The generality table: per shape, each row's mean ± std over seeds and its per-seed values; minutes; and
    whether the final model beat the baseline and the SSL fine-tune on every seed."""
    lines = ["| shape | pool, image | " + " | ".join(ROWS.values())
             + " | final − baseline (points) | final > baseline and > SSL fine-tune, every seed | final model chosen"
             " | minutes: pretrain (planned) + fine-tune + self-train per seed (planned) |",
             "|---|---|" + "---|" * len(ROWS) + "---|---|---|---|"]
    for shape in SHAPES:
        rows = sorted((p for p in points if p["shape"] == shape), key=lambda p: p["seed"])
        if not rows:
            continue
        cells = [_cell([p[k] for p in rows if k in p]) + "<br>" + " / ".join(f"{p[k]:.4f}" for p in rows if k in p)
                 for k in ROWS]
        gain = _cell([100 * (p["ssl_semi"] - p["baseline"]) for p in rows])
        every = all(p["ssl_semi"] > p["baseline"] and p["ssl_semi"] > p["ssl"] for p in rows)
        chosen = ", ".join(p.get("ssl_semi_final", "?") for p in rows)
        first = rows[0]
        minutes = (f"{first['pretrain_s'] / 60:.1f} ({first['planned_pretrain_s'] / 60:.1f}) + "
                   f"{statistics.fmean(p['ssl_s'] + p['baseline_s'] for p in rows) / 60:.1f} + "
                   f"{statistics.fmean(p['ssl_semi_s'] for p in rows) / 60:.1f} "
                   f"({first['planned_self_train_s'] / 60:.1f})")
        shape_text = "×".join(str(d) for d in first["image_shape"])
        lines.append(f"| {shape} (seeds {', '.join(str(p['seed']) for p in rows)}) | {first['pool']}, {shape_text}, "
                     f"{first['classes']} classes, {first['num_test']} test | " + " | ".join(cells)
                     + f" | {gain} | {'yes' if every else 'NO'} | {chosen} | {minutes} |")
    return "\n".join(lines)


def _candidates(point: dict, kind: str, measure: str) -> list[str]:
    """The candidates of ``kind`` (``ssl_semi``, ``scratch_semi``) with a recorded ``measure`` (val, dev, test) in
    ``point``, in the order the rule takes them: the fine-tune, then each round."""
    prefix, suffix = f"{kind}_", f"_{measure}"
    names = [k[len(prefix):-len(suffix)] for k in point if k.startswith(prefix) and k.endswith(suffix)]
    names = [n for n in names if n == "fine_tune" or n.startswith("round_")]
    return sorted(names, key=lambda name: -1 if name == "fine_tune" else int(name.split("_")[1]))


def _fine_tune_optimism(point: dict, kind: str) -> float:
    """The recorded val optimism of ``kind``'s fine-tune candidate (its teacher); 0 where none was recorded."""
    return max(0.0, point.get(f"{TEACHERS[kind]}_val_optimism", 0.0))


def _rule_scores(point: dict, kind: str, names: list[str]) -> list[float]:
    """What the rule compares (``ssl_lib.self_train.Candidate.selection_score``): each candidate's recorded val
    accuracy, the fine-tune's less its teacher's recorded val optimism."""
    optimism = _fine_tune_optimism(point, kind)
    return [point[f"{kind}_{name}_val"] - (optimism if name == "fine_tune" else 0.0) for name in names]


def _candidate_label(name: str) -> str:
    """``fine_tune`` -> ``fine-tune``, ``round_2`` -> ``round 2``: as the main table names them."""
    return "fine-tune" if name == "fine_tune" else name.replace("_", " ")


def selection_table(points: list[dict], margin: float) -> str:
    """Per shape and seed, each SSL + semi-supervised candidate's val / dev / test accuracy, the fine-tune's val
    optimism, the one the committed rule chose (from val) and the one dev would have chosen: how the rule fares,
    judged on dev (the pool's hidden labels), never on test. Empty when no point recorded its candidates' dev
    accuracies."""
    rows = []
    for point in sorted(points, key=lambda p: (SHAPES.index(p["shape"]), p["seed"])):
        names = _candidates(point, "ssl_semi", "dev")
        if len(names) >= 2:
            rows.append((point, names))
    if not rows:
        return ""
    width = max(len(names) for _, names in rows)
    head = ["fine-tune"] + [f"round {i}" for i in range(1, width)]
    lines = ["| shape | seed | " + " | ".join(f"{h}: val / dev / test" for h in head)
             + " | fine-tune's val optimism | rule's choice (val) | dev's best |", "|---|---|" + "---|" * (width + 3)]
    for point, names in rows:
        cells = [f"{point[f'ssl_semi_{n}_val']:.4f} / {point[f'ssl_semi_{n}_dev']:.4f} / "
                 f"{point[f'ssl_semi_{n}_test']:.4f}" for n in names] + ["-"] * (width - len(names))
        by_rule = names[choose_final(_rule_scores(point, "ssl_semi", names), margin)]
        by_dev = max(names, key=lambda n: point[f"ssl_semi_{n}_dev"])
        lines.append(f"| {point['shape']} | {point['seed']} | " + " | ".join(cells)
                     + f" | {_fine_tune_optimism(point, 'ssl_semi'):.4f} | {_candidate_label(by_rule)} | "
                     f"{_candidate_label(by_dev)} |")
    return "\n".join(lines)


def machine_header(command: str, points_file: Path) -> str:
    """Where, when and how the table was measured."""
    when = time.strftime("%Y-%m-%d", time.gmtime(points_file.stat().st_mtime)) if points_file.is_file() else "?"
    return (f"Measured {when} on {machine()}, {torch.get_num_threads()} torch threads: "
            f"`.venv/bin/python {command}` with params.yaml as committed (only the data source changed). Each cell: "
            f"mean ± std over seeds, then each seed's value. Test accuracy; the final model is chosen by the "
            f"committed rule from each candidate's recorded val accuracy and the fine-tune's recorded val optimism; "
            f"minutes are wall-clock.\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--points", default="benchmarks/results/generality_points.jsonl",
                        help="JSON lines, one per shape and seed: new points are appended, the table is built "
                             "from every point in it (a point measured again replaces the earlier one)")
    parser.add_argument("--out", default="benchmarks/results/generality.md")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("SSLPIPE_THREADS", torch.get_num_threads())))
    base = read_raw_params(args.params)
    seeds = [int(s) for s in args.seeds.split(",")]
    points_file = Path(args.points)
    if not args.table_only:
        with tempfile.TemporaryDirectory() as tmp:
            for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
                for point in run_shape(shape, seeds, base, Path(tmp)):
                    points_file.parent.mkdir(parents=True, exist_ok=True)
                    with points_file.open("a") as fh:
                        fh.write(json.dumps(point) + "\n")
    points: dict[tuple[str, int], dict] = {}
    if points_file.is_file():
        for line in points_file.read_text().splitlines():
            if line.strip():
                point = json.loads(line)
                points[(point["shape"], point["seed"])] = point
    margin = parse_params(base).self_train.selection_margin
    table = summarize([apply_rule(p, margin) for p in points.values()])
    selection = selection_table(list(points.values()), margin)
    if selection:
        table += ("\n\nThe final-model rule per candidate (SSL + semi-supervised; val / dev / test accuracy; dev is "
                  "the unlabeled pool's hidden labels):\n\n" + selection)
    print(table)
    with atomic_path(args.out) as tmp_path:
        Path(tmp_path).write_text(machine_header("benchmarks/generality.py", points_file) + table + "\n")


if __name__ == "__main__":
    main()
