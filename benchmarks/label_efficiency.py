"""Label efficiency on Fashion-MNIST: test accuracy against labels per class, mean ± std over seeds.

Rows, each trained exactly as the pipeline's stages train them with params.yaml's settings:
- supervised-only: the finetune stage's baseline (random init, the same labels, augmentation and passes);
- SSL fine-tune: the pretrained encoder fine-tuned by the finetune stage (LP-FT);
- SSL + semi-supervised: that model improved by the self_train stage's method on the unlabeled pool;
- semi-supervised from scratch (at --scratch-labels): the same self_train method started from the
  supervised-only model, with no pretraining: what pretraining adds on top of semi-supervised learning.

The seed moves the draw of labeled and val images, the initialisation of every classifier and the
self-training randomness. Pretraining never sees labels; by default one encoder (pretrained with seed 0, as
`make run` does) serves every seed, and ``--pretrain-per-seed`` pretrains one per seed. Every grid point is an
MLflow run in the experiment `ssl-label-efficiency`; the table (markdown) and the plot are written to --out.

    .venv/bin/python benchmarks/label_efficiency.py                      # 1, 5, 10, 50, 60 labels x 3 seeds
    .venv/bin/python benchmarks/label_efficiency.py --labels 10 --seeds 0 --pretrain-epochs 1   # a quick check
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

from ssl_lib.classifier import FinetuneSettings, build_classifier, val_optimism
from ssl_lib.config import load_params
from ssl_lib.data.ingest import ingest
from ssl_lib.data.prepared import load_prepared
from ssl_lib.evaluation import predict_proba
from ssl_lib.finetune import KINDS, finetune_pair
from ssl_lib.io import atomic_path
from ssl_lib.pretrain import pretrain
from ssl_lib.pretrain_plan import PretrainSettings, make_pseudo_labels
from ssl_lib.self_train import SelfTrainSettings, self_train
from ssl_lib.self_train_pool import SelfTrainPool

ROWS = {"baseline": "supervised-only", "ssl": "SSL fine-tune", "ssl_semi": "SSL + semi-supervised",
        "scratch_semi": "semi-supervised from scratch"}


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict_proba(model, images).argmax(1) == labels).mean())


def run_point(params, encoder_state, seed: int, labels_per_class: int, with_scratch: bool, work: Path) -> dict:
    """One grid point: ingest with this seed and budget, then every row; returns test accuracies and timings."""
    params = params.model_copy(update={"seed": seed})
    out = work / f"prepared-{seed}-{labels_per_class}"
    ingest(params.data.source, params.data.path, seed, labels_per_class=labels_per_class, label_fraction=None,
           val_per_class=params.data.val_per_class, test_fraction=params.data.test_fraction, out_dir=out)
    data = load_prepared(out)
    train_x, train_y = data.split("labeled")
    val_x, val_y = data.split("val")
    test_x, test_y = data.split("test")
    pool = SelfTrainPool.of(data)
    pool_images = pool.images()
    spec = dict(backbone=params.pretrain.backbone, in_channels=int(data.meta["shape"][2]),
                image_size=int(data.meta["shape"][0]), num_classes=len(data.class_names), mean=data.meta["mean"],
                std=data.meta["std"])
    semi = SelfTrainSettings.from_params(params, pool.size, spec["num_classes"], spec["image_size"])
    result: dict = {"seed": seed, "labels_per_class": labels_per_class, "num_test": int(len(test_y))}
    pair = finetune_pair(spec, encoder_state, train_x, train_y, val_x, val_y,
                         {kind: FinetuneSettings.from_params(params, spec["image_size"], baseline=kind == "baseline")
                          for kind in KINDS}, seed=seed, progress=False)
    models = pair.models
    for kind in KINDS:
        result[f"{kind}_val_optimism"] = val_optimism(pair.histories[kind])
        result[kind] = accuracy(models[kind], test_x, test_y)
        result[f"{kind}_s"] = pair.seconds[kind]  # building and training it (the test accuracy not included)
    # Dev: the unlabeled pool's hidden labels, for choosing settings without the test split (never trained on
    # as labels: these images enter self-training unlabeled).
    unlabeled = np.flatnonzero(data.manifest["split"].to_numpy()[pool.rows] == "unlabeled")
    dev_x, dev_y = pool_images[unlabeled], data.manifest["label"].to_numpy()[pool.rows][unlabeled]
    for kind in ("ssl", "baseline"):
        result[f"{kind}_dev"] = accuracy(models[kind], dev_x, dev_y)
    for kind, teacher in (("ssl_semi", "ssl"), ("scratch_semi", "baseline")):
        if kind == "scratch_semi" and not with_scratch:
            continue
        start = time.perf_counter()
        semi_result = self_train(models[teacher], pool_images, pool.labeled, pool.labels, val_x, val_y, semi,
                                 progress=False, teacher_val_optimism=result[f"{teacher}_val_optimism"])
        result[f"{kind}_s"] = time.perf_counter() - start
        result[kind] = accuracy(semi_result.model, test_x, test_y)
        result[f"{kind}_dev"] = accuracy(semi_result.model, dev_x, dev_y)
        result[f"{kind}_pseudo_label_val_accuracy"] = semi_result.rounds[-1]["pseudo_label_val_accuracy"]
        # The final model is chosen on val (ssl_lib.self_train.choose_final); every candidate's test accuracy is
        # recorded to report how the rule fared, never to choose.
        result[f"{kind}_final"] = semi_result.candidates[semi_result.chosen].name
        for candidate in semi_result.candidates:
            model = build_classifier(**spec)
            model.load_state_dict(candidate.state)
            name = candidate.name.replace(" ", "_").replace("-", "_")
            result[f"{kind}_{name}_val"] = candidate.val_accuracy
            # Dev (hidden pool labels) is where a selection rule may be judged; test only reports how it fared.
            result[f"{kind}_{name}_dev"] = accuracy(model.eval(), dev_x, dev_y)
            result[f"{kind}_{name}_test"] = accuracy(model, test_x, test_y)
    return result


def summarize(results: list[dict], labels: list[int]) -> tuple[str, dict]:
    """A markdown table (mean ± std over seeds per row and budget) and the per-row means for the plot."""
    lines = ["| row | " + " | ".join(f"{n} labels/class" for n in labels) + " |", "|---|" + "---|" * len(labels)]
    means: dict = {}
    for kind, title in ROWS.items():
        cells = []
        for n in labels:
            values = [r[kind] for r in results if r["labels_per_class"] == n and kind in r]
            if not values:
                cells.append("-")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            means.setdefault(kind, {})[n] = (mean, std, len(values))
            cells.append(f"{mean:.4f} ± {std:.4f} (n={len(values)})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines), means


def plot(means: dict, labels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, title in ROWS.items():
        if kind not in means:
            continue
        xs = [n for n in labels if n in means[kind]]
        ys = np.array([means[kind][n][0] for n in xs])
        sd = np.array([means[kind][n][1] for n in xs])
        marker = "s" if kind == "scratch_semi" else "o"
        ax.errorbar(xs, ys, yerr=sd, marker=marker, capsize=3, label=title,
                    linestyle="none" if len(xs) == 1 else "-")
    ax.set_xscale("log")
    ax.set_xticks(labels, labels=[str(n) for n in labels])
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("Fashion-MNIST: what the unlabeled pool buys")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def log_point(result: dict, params) -> None:
    import mlflow

    mlflow.set_experiment("ssl-label-efficiency")
    name = f"{result['labels_per_class']}/class seed {result['seed']}"
    with mlflow.start_run(run_name=name):
        mlflow.log_params({"seed": result["seed"], "labels_per_class": result["labels_per_class"],
                           "pretrain.method": params.pretrain.method, "pretrain.epochs": params.pretrain.epochs,
                           **{f"self_train.{k}": v for k, v in params.self_train.model_dump().items()},
                           "self_train.method": "+".join(params.self_train.steps) or "none"})
        mlflow.log_metrics({f"test_accuracy_{k}": float(result[k]) for k in ROWS if k in result})
        mlflow.log_metrics({k: float(v) for k, v in result.items() if k.endswith("_s") or "pseudo" in k})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default="1,5,10,50,60", help="labels per class, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scratch-labels", default="10", help="budgets that also get the from-scratch row")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="override pretrain.epochs (quick checks)")
    parser.add_argument("--pretrain-per-seed", action="store_true", help="one encoder per seed instead of seed 0's")
    parser.add_argument("--encoder", default=None, help="use this encoder state_dict (seed 0's) instead of pretraining")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--out", default="benchmarks/results", help="folder for label_efficiency.md/.png")
    parser.add_argument("--points", default=None,
                        help="JSON-lines file of grid points: each new point is appended, and the table and plot are "
                             "built from every point in it (so a grid can be run in parts); default: none kept")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table and plot from --points")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("SSLPIPE_THREADS", torch.get_num_threads())))
    params = load_params(args.params)
    if args.pretrain_epochs:
        params = params.model_copy(update={"pretrain": params.pretrain.model_copy(
            update={"epochs": args.pretrain_epochs})})
    labels = [int(n) for n in args.labels.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    scratch = {int(n) for n in args.scratch_labels.split(",") if n}
    if not args.no_mlflow:
        import mlflow

        from tasks.environment import configure_environment

        configure_environment()
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])

    results: list[dict] = _read_points(args.points) if args.points else []
    encoders: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.table_only:
            seeds = []
        work = Path(tmp)
        for seed in seeds:
            encoder_seed = seed if args.pretrain_per_seed else 0
            if encoder_seed not in encoders:
                if args.encoder and encoder_seed == 0:
                    encoders[0] = torch.load(args.encoder, weights_only=True)
                else:
                    data = load_prepared(_ingest_any(params, encoder_seed, work))
                    pool = data.pretrain_pool()
                    settings = replace(PretrainSettings.from_params(params, len(pool)), seed=encoder_seed)
                    start = time.perf_counter()
                    encoders[encoder_seed] = pretrain(pool, data.meta["mean"], data.meta["std"],
                                                      make_pseudo_labels(settings, len(pool)), settings,
                                                      progress=False).encoder_state
                    print(f"pretrained seed {encoder_seed} in {time.perf_counter() - start:.0f} s", flush=True)
            for n in labels:
                result = run_point(params, encoders[encoder_seed], seed, n, n in scratch, work)
                results = [r for r in results if (r["seed"], r["labels_per_class"]) != (seed, n)] + [result]
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, flush=True)
                if args.points:
                    with open(args.points, "a") as fh:
                        fh.write(json.dumps(result) + "\n")
                if not args.no_mlflow:
                    log_point(result, params)
    table, means = summarize(results, labels)
    seeds = sorted({r["seed"] for r in results})
    header = (f"Fashion-MNIST test accuracy (10 000 images), mean ± std over seeds {seeds}; pretraining "
              f"{params.pretrain.method} ({params.pretrain.backbone}) for "
              f"{_budget(params.pretrain.epochs, params.pretrain.images_seen)}, self-training "
              f"{'+'.join(params.self_train.steps) or 'none'} x {params.self_train.rounds} rounds for "
              f"{_budget(params.self_train.epochs, params.self_train.images_seen)} (lr {params.self_train.lr:g})"
              f"{', balanced' if params.self_train.balance else ''}"
              f"{', whitened graph' if params.self_train.whiten else ''}"
              f"{', BatchNorm recalibrated' if params.self_train.bn_recalibration else ''}; encoder: "
              f"{'one per seed' if args.pretrain_per_seed else 'seed 0, shared'}.\n\n")
    print(header + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "label_efficiency.md") as tmp_path:
        Path(tmp_path).write_text(header + table + "\n")
    plot(means, labels, out / "label_efficiency.png")


def _budget(epochs: float | None, images_seen: int) -> str:
    return f"{epochs:g} epochs" if epochs is not None else f"{images_seen} images seen"


def _read_points(path: str) -> list[dict]:
    """Grid points from a JSON-lines file; a point measured again replaces the earlier one."""
    if not Path(path).is_file():
        return []
    points: dict[tuple[int, int], dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            points[(point["seed"], point["labels_per_class"])] = point
    return list(points.values())


def _ingest_any(params, seed: int, work: Path) -> Path:
    """A prepared dataset for pretraining: its pool (every non-test image) does not depend on the label budget."""
    out = work / f"pool-{seed}"
    ingest(params.data.source, params.data.path, seed, labels_per_class=1, label_fraction=None,
           val_per_class=params.data.val_per_class, test_fraction=params.data.test_fraction, out_dir=out)
    return out


if __name__ == "__main__":
    main()
