"""Test-set evaluation: probabilities, features, kNN accuracy, per-class metrics, confusion matrix, and
``evaluate_classifiers``, the evaluate stage's recipe that puts them together."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ssl_lib.augment import nhwc_to_tensor
from ssl_lib.classifier import Classifier, build_classifier
from ssl_lib.io import atomic_path


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _batched(model: nn.Module, images: np.ndarray, batch_size: int, fn) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 NHWC, got {images.dtype}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = nhwc_to_tensor(images[i:i + batch_size], device).float().div_(255.0)
                outputs.append(fn(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)


def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax class probabilities (N, K) of a Classifier for uint8 NHWC images."""
    return _batched(model, images, batch_size, lambda x: torch.softmax(model(x), dim=1))


def extract_features(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Encoder features (N, D) of a Classifier (its ``features`` method) for uint8 NHWC images."""
    return _batched(model, images, batch_size, model.features)


def predict_proba_and_features(model: Classifier, images: np.ndarray, batch_size: int = 512
                               ) -> tuple[np.ndarray, np.ndarray]:
    """``predict_proba`` and ``extract_features`` of a Classifier for uint8 NHWC images, from one pass of its
    encoder: the same numbers as the two calls, at half the encoder's work."""
    def probs_and_features(x: torch.Tensor) -> torch.Tensor:
        features = model.features(x)
        return torch.cat([torch.softmax(model.head(features), dim=1), features], dim=1)

    both = _batched(model, images, batch_size, probs_and_features)
    return both[:, :model.num_classes], both[:, model.num_classes:]


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, *, k: int, temperature: float = 0.07) -> float:
    """Weighted kNN accuracy with cosine similarity (Wu et al., 2018).

    Each of the k nearest training samples votes for its class with weight exp(cos(q, x_i) / T);
    the class with the largest total wins. k is capped at the number of training samples.
    """
    train = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_feats), dtype=torch.float32), dim=1)
    test = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_feats), dtype=torch.float32), dim=1)
    y_train = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    y_test = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    k = min(k, len(train))
    correct = 0
    for i in range(0, len(test), 1024):  # chunks keep the similarity matrix small
        sims, idx = (test[i:i + 1024] @ train.t()).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, y_train[idx], torch.exp(sims / temperature))
        correct += int((votes.argmax(1) == y_test[i:i + 1024]).sum())
    return correct / len(test)


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per class: precision, recall, f1, support (sklearn, zero_division=0)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return pd.DataFrame({"class": list(class_names), "precision": precision, "recall": recall, "f1": f1,
                         "support": support.astype(int)})


def wide_per_class_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per class: its support, then each model's precision, recall and f1 (``<model>_f1``...), models in
    the order given. ``tables`` maps a model's name to its ``per_class_table`` (same classes, same order)."""
    first = next(iter(tables.values()))
    wide = first[["class", "support"]].copy()
    for name, table in tables.items():
        if list(table["class"]) != list(first["class"]):
            raise ValueError(f"per-class table of {name!r} lists other classes than the first one")
        for column in ("precision", "recall", "f1"):
            wide[f"{name}_{column}"] = table[column].to_numpy()
    return wide


def save_per_class_png(tables: dict[str, pd.DataFrame], path: str | Path, labels: dict[str, str] | None = None,
                       accuracies: dict[str, float] | None = None) -> None:
    """Write one bar chart, atomically: each class's recall (its share of test images classified right) for every
    model side by side. ``labels`` name the models in the legend, ``accuracies`` add each one's overall accuracy."""
    import matplotlib

    matplotlib.use("Agg")  # here, not at import: importing this module must not change global state
    import matplotlib.pyplot as plt

    names = list(tables)
    classes = list(next(iter(tables.values()))["class"])
    k, m = len(classes), len(names)
    width = 0.8 / max(1, m)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * k * m + 2), 4.5))
    for i, name in enumerate(names):
        label = (labels or {}).get(name, name)
        if accuracies and name in accuracies:
            label = f"{label} ({accuracies[name]:.3f})"
        ax.bar(np.arange(k) + (i - (m - 1) / 2) * width, tables[name]["recall"].to_numpy(), width, label=label)
    ax.set_xticks(range(k), labels=classes, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center",
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall (share of the class classified right)")
    ax.set_title("per-class test recall" + (" (overall accuracy in the legend)" if accuracies else ""), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def save_confusion_png(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                       path: str | Path, model_name: str | None = None) -> None:
    """Write the confusion matrix (rows: true class, columns: predicted) as a PNG, atomically; the title names
    ``model_name`` and its accuracy."""
    import matplotlib

    matplotlib.use("Agg")  # here, not at import: importing this module must not change global state
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    size = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > threshold else "black")
    accuracy = f"accuracy {np.trace(cm) / max(1, cm.sum()):.3f}"
    ax.set_title(f"{model_name}: {accuracy}" if model_name else f"confusion matrix ({accuracy})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_classifiers`` measured on the test split."""

    # results/metrics.json: per model (its name) accuracy, knn_accuracy and macro_f1; the kNN accuracy of the
    # pretrained and of a random encoder; ssl_gain (and self_train_gain) over the baseline; num_test.
    metrics: dict[str, Any]
    predicted: dict[str, np.ndarray]  # per model, the class index it predicts for each test image
    tables: dict[str, pd.DataFrame]  # per model, its per_class_table
    predictions: pd.DataFrame  # one row per test image: "actual", then each model's predicted class name
    final: str  # the final model: "self_train" when it was evaluated, else "ssl"


def evaluate_classifiers(models: Mapping[str, Classifier], test_images: np.ndarray, test_labels: np.ndarray,
                         known_images: np.ndarray, known_labels: np.ndarray, class_names: Sequence[str],
                         spec: Mapping[str, Any], encoder_state: dict[str, torch.Tensor], knn_k: int,
                         seed: int) -> Evaluation:
    """Every classifier in ``models`` on the test split, and what pretraining alone bought.

    ``models`` (in eval mode) maps "ssl" and "baseline", and "self_train" when it ran, to a Classifier. Each gets
    its accuracy, macro F1, per-class table and the kNN accuracy (``knn_k`` neighbours among ``known_images``,
    the labeled and val images) of its frozen features. The encoder ``encoder_state`` and a random one, built as
    classifiers of ``spec`` after ``torch.manual_seed(seed)``, get the kNN accuracy of their features.
    """
    test_y = test_labels

    def knn(model, test_features: np.ndarray | None = None) -> float:
        if test_features is None:
            test_features = extract_features(model, test_images)
        return knn_accuracy(extract_features(model, known_images), known_labels, test_features, test_y, k=knn_k)

    final = "self_train" if "self_train" in models else "ssl"
    metrics: dict[str, Any] = {}
    correct: dict[str, int] = {}
    predicted: dict[str, np.ndarray] = {}
    predictions = pd.DataFrame({"actual": [class_names[i] for i in test_y]})
    tables = {}
    for kind, model in models.items():
        probs, test_features = predict_proba_and_features(model, test_images)
        predicted[kind] = probs.argmax(axis=1)
        tables[kind] = per_class_table(test_y, predicted[kind], class_names)
        correct[kind] = int((predicted[kind] == test_y).sum())
        metrics[kind] = {"accuracy": correct[kind] / len(test_y), "knn_accuracy": knn(model, test_features),
                         "macro_f1": float(tables[kind]["f1"].mean())}
        predictions[kind] = [class_names[i] for i in predicted[kind]]

    # Frozen features before any label was seen: what pretraining alone bought over random weights.
    torch.manual_seed(seed)
    metrics["pretrained_encoder_knn_accuracy"] = knn(build_classifier(**spec, encoder_state=encoder_state).eval())
    torch.manual_seed(seed)
    metrics["random_encoder_knn_accuracy"] = knn(build_classifier(**spec).eval())
    # From the counts of right answers: one division, so 0.0246 reads 0.0246, not 0.024599999999999955.
    metrics["ssl_gain"] = (correct["ssl"] - correct["baseline"]) / len(test_y)
    if "self_train" in metrics:
        metrics["self_train_gain"] = (correct["self_train"] - correct["baseline"]) / len(test_y)
    metrics["num_test"] = int(len(test_y))
    return Evaluation(metrics=metrics, predicted=predicted, tables=tables, predictions=predictions, final=final)
