"""Every registered SSL method on Fashion-MNIST under one fixed budget: a side-by-side table.

Each method pretrains on the same images for the same number of images seen (default 120000, two passes
over the 60000-image pool), with the pipeline's own settings from params.yaml (backbone, batch size,
learning rate, the method's options there; the masked and autoregressive methods get the ViT). Its frozen
features are then probed (kNN and a linear probe, both fit on 5000 training images that are not in the
labeled set) and it is fine-tuned on 10 labels per class (+10 for validation) exactly as the finetune stage
does. The supervised-only baseline is trained once, as the finetune stage trains it, on the same labels.
Each method is one MLflow run in the experiment `ssl-methods-benchmark`, so the UI compares them.

    .venv/bin/python benchmarks/methods.py                        # every method
    .venv/bin/python benchmarks/methods.py --methods rotation,simclr --images-seen 20000
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ssl_lib.classifier import FinetuneSettings, build_classifier, train_classifier
from ssl_lib.config import load_params
from ssl_lib.data.ingest import ingest
from ssl_lib.data.prepared import load_prepared
from ssl_lib.evaluation import extract_features, knn_accuracy, predict_proba
from ssl_lib.io import atomic_path
from ssl_lib.methods import METHODS
from ssl_lib.pretrain import pretrain
from ssl_lib.pretrain_plan import PretrainSettings, make_pseudo_labels

# Methods that need a token-based encoder get the small ViT; the rest the CPU-default ConvNet.
VIT_METHODS = {"mae", "autoregressive"}


def probe_linear(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def test_accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict_proba(model, images).argmax(1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(sorted(METHODS)))
    parser.add_argument("--images-seen", type=int, default=120000, help="pretraining budget per method")
    parser.add_argument("--probe-images", type=int, default=5000)
    parser.add_argument("--params", default="params.yaml", help="pipeline params: pretrain and finetune settings")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="override finetune.epochs (quick checks)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--speed-only", type=int, default=0, metavar="STEPS",
                        help="only measure pretraining speed: median over STEPS steps (after 3 warm-up steps)")
    args = parser.parse_args()
    params = load_params(args.params)
    seed = params.seed
    torch.manual_seed(seed)
    if args.speed_only:
        measure_speed(params, [m.strip() for m in args.methods.split(",") if m.strip()], args.speed_only, args.out)
        return

    with tempfile.TemporaryDirectory() as tmp:
        ingest("fashion-mnist", None, seed, labels_per_class=10, label_fraction=None, val_per_class=10,
               test_fraction=0.2, out_dir=Path(tmp) / "prepared")
        data = load_prepared(Path(tmp) / "prepared")
        pool = data.pretrain_pool()
        train_x, train_y = data.split("labeled")
        val_x, val_y = data.split("val")
        test_x, test_y = data.split("test")
        unlabeled_idx = data.indices("unlabeled")[: args.probe_images]
        probe_x = np.asarray(data.images[unlabeled_idx])
        probe_y = data.manifest["label"].to_numpy()[unlabeled_idx]
    mean, std = data.meta["mean"], data.meta["std"]
    channels, size = data.meta["shape"][2], data.meta["shape"][0]
    finetune = FinetuneSettings.from_params(params, size)
    baseline_finetune = FinetuneSettings.from_params(params, size, baseline=True)
    if args.finetune_epochs is not None:
        finetune = replace(finetune, epochs=args.finetune_epochs,
                           lp_epochs=min(finetune.lp_epochs, args.finetune_epochs))
        baseline_finetune = replace(baseline_finetune, epochs=args.finetune_epochs)

    conv_backbone = params.pretrain.backbone if params.pretrain.backbone != "vit_tiny" else "convnet_small"
    baseline = build_classifier(conv_backbone, channels, size, 10, mean, std, seed=seed)
    baseline, _ = train_classifier(baseline, train_x, train_y, val_x, val_y, baseline_finetune, progress=False)
    baseline_acc = test_accuracy(baseline, test_x, test_y)

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    # The reference every probe must beat: the same architecture at random init, probed the same way.
    for backbone in [conv_backbone] + (["vit_tiny"] if VIT_METHODS & set(names) else []):
        encoder = build_classifier(backbone, channels, size, 10, mean, std, seed=seed)
        feats_probe, feats_test = extract_features(encoder, probe_x), extract_features(encoder, test_x)
        rows.append({"method": "random init", "family": "-", "backbone": backbone,
                     "knn": round(knn_accuracy(feats_probe, probe_y, feats_test, test_y, k=20), 4),
                     "linear_probe": round(probe_linear(feats_probe, probe_y, feats_test, test_y), 4),
                     "baseline_10": round(baseline_acc, 4), "note": "no pretraining"})
        print(rows[-1], flush=True)
        if not args.no_mlflow:
            log_to_mlflow(rows[-1], {"method": "random init", "backbone": backbone, "epochs": 0})
    for name in names:
        backbone = "vit_tiny" if name in VIT_METHODS else conv_backbone
        epochs = max(1, round(args.images_seen / len(pool)))
        max_images = min(len(pool), args.images_seen)
        settings = replace(PretrainSettings.from_params(params, len(pool)), method=name, backbone=backbone,
                           epochs=epochs, max_images=max_images,
                           options=dict(params.pretrain.options.get(name) or {}))
        try:
            start = time.perf_counter()
            result = pretrain(pool, mean, std, make_pseudo_labels(settings, len(pool)), settings, progress=False)
            seconds = time.perf_counter() - start
        except ValueError as err:  # e.g. colorization on grayscale data: reported, not fatal
            rows.append({"method": name, "family": METHODS[name].family, "note": str(err).splitlines()[0]})
            continue
        encoder = build_classifier(backbone, channels, size, 10, mean, std, encoder_state=result.encoder_state,
                                   seed=seed)
        feats_probe, feats_test = extract_features(encoder, probe_x), extract_features(encoder, test_x)
        model, _ = train_classifier(encoder, train_x, train_y, val_x, val_y, finetune, progress=False)
        row = {"method": name, "family": METHODS[name].family, "backbone": backbone, "pretrain_s": round(seconds, 1),
               "images_per_s": round(epochs * max_images / seconds, 1),
               "knn": round(knn_accuracy(feats_probe, probe_y, feats_test, test_y, k=20), 4),
               "linear_probe": round(probe_linear(feats_probe, probe_y, feats_test, test_y), 4),
               "finetune_10": round(test_accuracy(model, test_x, test_y), 4),
               "baseline_10": round(baseline_acc, 4), "note": ""}
        rows.append(row)
        print(row, flush=True)
        if not args.no_mlflow:
            log_to_mlflow(row, {"method": settings.method, "backbone": settings.backbone, "epochs": settings.epochs,
                                "max_images": settings.max_images, "batch_size": settings.batch_size})

    columns = ["method", "family", "backbone", "pretrain_s", "images_per_s", "knn", "linear_probe", "finetune_10",
               "baseline_10", "note"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    print("\n".join(lines))
    if args.out:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n")


def measure_speed(params, methods: list[str], steps: int, out: str | None) -> None:
    """Images/s of each method's pretraining step (the engine's own loop), median over ``steps`` timed steps."""
    import statistics

    from ssl_lib.data.sources import load_source

    raw = load_source("fashion-mnist", None)
    images = raw.images[~raw.predefined_test]
    lines = ["| method | backbone | batch | images/s (median) | ms/step (median) |", "|---|---|---|---|---|"]
    for name in methods:
        backbone = "vit_tiny" if name in VIT_METHODS else params.pretrain.backbone
        settings = replace(PretrainSettings.from_params(params, len(images)), method=name, backbone=backbone, epochs=1,
                           max_images=(steps + 3) * params.pretrain.batch_size,
                           options=dict(params.pretrain.options.get(name) or {}))
        stamps: list[float] = []
        try:
            pretrain(images, [0.286], [0.353], make_pseudo_labels(settings, len(images)), settings, progress=False,
                     on_step=lambda done, stamps=stamps: stamps.append(time.perf_counter()))
        except ValueError as err:
            lines.append(f"| {name} | {backbone} | | {str(err).splitlines()[0][:60]}... | |")
            continue
        step_s = statistics.median(b - a for a, b in itertools.pairwise(stamps[3:]))
        lines.append(f"| {name} | {backbone} | {settings.batch_size} | {settings.batch_size / step_s:.0f} | "
                     f"{step_s * 1000:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if out:
        with atomic_path(out) as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n")


def log_to_mlflow(row: dict, run_params: dict) -> None:
    import mlflow

    from tasks.environment import configure_environment

    configure_environment()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("ssl-methods-benchmark")
    with mlflow.start_run(run_name=f"{row['method']} ({row['backbone']})"):
        mlflow.log_params(run_params)
        mlflow.set_tag("family", row["family"])
        mlflow.log_metrics({k: float(row[k]) for k in ("pretrain_s", "images_per_s", "knn", "linear_probe",
                                                       "finetune_10", "baseline_10") if k in row})


if __name__ == "__main__":
    main()
