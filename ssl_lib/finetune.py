"""The pair the pipeline compares, fine-tuned: the pretrained encoder plus a head (the SSL model), and the same
classifier from random weights (the supervised-only baseline), trained on the same labels by ``train_classifier``.

The finetune stage's recipe, and the benchmarks' that train the two rows as the stage does.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ssl_lib.classifier import Classifier, FinetuneSettings, build_classifier, train_classifier
from ssl_lib.errors import TrainingDiverged

# The two models, in the order they are trained.
KINDS = ("ssl", "baseline")
EpochCallback = Callable[[str, dict[str, Any]], None]  # (kind, history row)


class ClassifierDiverged(TrainingDiverged):
    """One of the pair's training diverged: the message names the model (``kind``), then the phase and step."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind} classifier: {message}")
        self.kind = kind


@dataclass(frozen=True)
class FinetunedPair:
    models: dict[str, Classifier]  # per kind: the best-val-epoch weights, in eval mode, on the training device
    histories: dict[str, list[dict[str, Any]]]  # per kind: train_classifier's history
    seconds: dict[str, float]  # per kind: building and training it, wall clock


def finetune_pair(spec: Mapping[str, Any], encoder_state: dict[str, torch.Tensor], train_images: np.ndarray,
                  train_labels: np.ndarray, val_images: np.ndarray | None, val_labels: np.ndarray | None,
                  settings: Mapping[str, FinetuneSettings], seed: int, on_epoch: EpochCallback | None = None,
                  on_lp_epoch: EpochCallback | None = None, progress: bool = True) -> FinetunedPair:
    """Build and train "ssl" (``spec``'s classifier on ``encoder_state``) and then "baseline" (random encoder
    weights), each seeded by ``seed`` and trained with ``settings[kind]``. ``on_epoch(kind, row)`` and
    ``on_lp_epoch(kind, row)`` get train_classifier's rows; a diverged training raises ``ClassifierDiverged``."""
    models: dict[str, Classifier] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for kind, state in zip(KINDS, (encoder_state, None), strict=True):
        start = time.perf_counter()
        model = build_classifier(**spec, encoder_state=state, seed=seed)
        try:
            models[kind], histories[kind] = train_classifier(
                model, train_images, train_labels, val_images, val_labels, settings[kind],
                on_epoch=None if on_epoch is None else _for(kind, on_epoch), progress=progress,
                on_lp_epoch=None if on_lp_epoch is None else _for(kind, on_lp_epoch))
        except TrainingDiverged as err:
            raise ClassifierDiverged(kind, str(err)) from None
        seconds[kind] = time.perf_counter() - start
    return FinetunedPair(models=models, histories=histories, seconds=seconds)


def _for(kind: str, callback: EpochCallback) -> Callable[[dict[str, Any]], None]:
    return lambda row: callback(kind, row)
