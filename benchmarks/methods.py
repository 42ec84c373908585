"""Every registered SSL method on Fashion-MNIST under one fixed budget: a side-by-side table.

Each method pretrains on the same images for the same number of images seen (default 60000, i.e. one
pass over the training set), then its frozen features are probed (kNN and a linear probe, both fit on
5000 labeled training images) and it is fine-tuned on 10 labels per class (+10 for validation). The
supervised-only baseline is trained once on the same labels. Each method is one MLflow run in the
experiment `ssl-methods-benchmark`, so the UI compares them.

    .venv/bin/python benchmarks/methods.py                        # every method
    .venv/bin/python benchmarks/methods.py --methods rotation,simclr --images-seen 20000
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lib.classifier import FinetuneSettings, build_classifier, train_classifier  # noqa: E402
from ssl_lib.data import ingest, load_prepared  # noqa: E402
from ssl_lib.evaluation import extract_features, knn_accuracy, predict_proba  # noqa: E402
from ssl_lib.methods import METHODS  # noqa: E402
from ssl_lib.pretrain import PretrainSettings, make_pseudo_labels, pretrain  # noqa: E402

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
    parser.add_argument("--images-seen", type=int, default=60000, help="pretraining budget per method")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--probe-images", type=int, default=5000)
    parser.add_argument("--finetune-epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        ingest("fashion-mnist", None, args.seed, labels_per_class=10, label_fraction=None, val_per_class=10,
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
    finetune = FinetuneSettings(mode="full", epochs=args.finetune_epochs, batch_size=64, lr=2e-3, weight_decay=5e-4,
                                seed=args.seed, augment=True, device="auto")

    baseline = build_classifier("convnet", channels, size, 10, mean, std, seed=args.seed)
    baseline, _ = train_classifier(baseline, train_x, train_y, val_x, val_y,
                                   replace(finetune, encoder_lr_mult=1.0), progress=False)
    baseline_acc = test_accuracy(baseline, test_x, test_y)

    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        backbone = "vit_tiny" if name in VIT_METHODS else "convnet"
        epochs = max(1, round(args.images_seen / len(pool)))
        max_images = min(len(pool), args.images_seen)
        settings = PretrainSettings(method=name, backbone=backbone, epochs=epochs, batch_size=args.batch_size,
                                    lr=2e-3, weight_decay=1e-4, seed=args.seed, max_images=max_images)
        try:
            start = time.perf_counter()
            result = pretrain(pool, mean, std, make_pseudo_labels(settings, len(pool)), settings, progress=False)
            seconds = time.perf_counter() - start
        except ValueError as err:  # e.g. colorization on grayscale data: reported, not fatal
            rows.append({"method": name, "family": METHODS[name].family, "note": str(err).splitlines()[0]})
            continue
        encoder = build_classifier(backbone, channels, size, 10, mean, std, encoder_state=result.encoder_state)
        feats_probe, feats_test = extract_features(encoder, probe_x), extract_features(encoder, test_x)
        model, _ = train_classifier(encoder, train_x, train_y, val_x, val_y, finetune, progress=False)
        row = {"method": name, "family": METHODS[name].family, "pretrain_s": round(seconds, 1),
               "images_per_s": round(epochs * max_images / seconds, 1),
               "knn": round(knn_accuracy(feats_probe, probe_y, feats_test, test_y, k=20), 4),
               "linear_probe": round(probe_linear(feats_probe, probe_y, feats_test, test_y), 4),
               "finetune_10": round(test_accuracy(model, test_x, test_y), 4),
               "baseline_10": round(baseline_acc, 4), "note": ""}
        rows.append(row)
        print(row, flush=True)
        if not args.no_mlflow:
            log_to_mlflow(row, settings)

    columns = ["method", "family", "pretrain_s", "images_per_s", "knn", "linear_probe", "finetune_10", "baseline_10",
               "note"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


def log_to_mlflow(row: dict, settings: PretrainSettings) -> None:
    import mlflow

    from tasks.environment import configure_environment

    configure_environment()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("ssl-methods-benchmark")
    with mlflow.start_run(run_name=row["method"]):
        mlflow.log_params({"method": settings.method, "backbone": settings.backbone, "epochs": settings.epochs,
                           "max_images": settings.max_images, "batch_size": settings.batch_size})
        mlflow.set_tag("family", row["family"])
        mlflow.log_metrics({k: float(row[k]) for k in ("pretrain_s", "images_per_s", "knn", "linear_probe",
                                                       "finetune_10", "baseline_10")})


if __name__ == "__main__":
    main()
