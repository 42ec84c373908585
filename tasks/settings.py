"""Map validated params onto ssl_lib's plain settings objects."""
from __future__ import annotations

from ssl_lib.classifier import FinetuneSettings
from ssl_lib.config import PipelineParams
from ssl_lib.pretrain_plan import PretrainSettings
from ssl_lib.self_train import SelfTrainSettings


def pretrain_settings(params: PipelineParams) -> PretrainSettings:
    p = params.pretrain
    return PretrainSettings(method=p.method, backbone=p.backbone, epochs=p.epochs, batch_size=p.batch_size,
                            lr=p.lr, weight_decay=p.weight_decay, seed=params.seed, max_images=p.max_images,
                            device=p.device, options=p.method_options(), precision=p.precision,
                            channels_last=None if p.channels_last == "auto" else p.channels_last,
                            compile=None if p.compile == "auto" else p.compile,
                            data_placement=p.data_placement, checkpoint_every=p.checkpoint_every)


def finetune_settings(params: PipelineParams, baseline: bool = False) -> FinetuneSettings:
    """The SSL model's fine-tuning, or the supervised-only baseline's training.

    The baseline trains a random-init encoder at the full learning rate with a random head: LP-FT and a
    prototype head need features worth keeping, and measured on Fashion-MNIST they did not help it.
    Its epochs default to the SSL model's lp_epochs + epochs, the same number of passes over the labels.
    """
    f = params.finetune
    common = dict(batch_size=f.batch_size, weight_decay=f.weight_decay, seed=params.seed, augment=f.augment,
                  device=f.device)
    if baseline:
        return FinetuneSettings(mode="full", epochs=f.baseline_epochs or f.epochs + f.lp_epochs,
                                lr=f.baseline_lr or f.lr, encoder_lr_mult=1.0, head_init="random", lp_epochs=0,
                                **common)
    return FinetuneSettings(mode=f.mode, epochs=f.epochs, lr=f.lr, encoder_lr_mult=f.encoder_lr_mult,
                            head_init=f.head_init, lp_epochs=f.lp_epochs, lp_lr=f.lp_lr, **common)


def self_train_settings(params: PipelineParams) -> SelfTrainSettings:
    s = params.self_train
    return SelfTrainSettings(steps=s.steps, rounds=s.rounds, epochs=s.epochs, batch_size=s.batch_size,
                             labeled_batch_size=s.labeled_batch_size, lr=s.lr, weight_decay=s.weight_decay,
                             unlabeled_weight=s.unlabeled_weight, ema_decay=s.ema_decay, threshold=s.threshold,
                             distribution_alignment=s.distribution_alignment, temperature=s.temperature,
                             knn_k=s.knn_k, alpha=s.alpha, balance=s.balance, seed=params.seed, device=s.device)
