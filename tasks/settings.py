"""Map validated params onto ssl_lib's plain settings objects."""
from __future__ import annotations

from ssl_lib.classifier import FinetuneSettings
from ssl_lib.config import PipelineParams
from ssl_lib.pretrain import PretrainSettings


def pretrain_settings(params: PipelineParams) -> PretrainSettings:
    p = params.pretrain
    return PretrainSettings(method=p.method, backbone=p.backbone, epochs=p.epochs, batch_size=p.batch_size,
                            lr=p.lr, weight_decay=p.weight_decay, seed=params.seed, max_images=p.max_images,
                            device=p.device, options=dict(p.options))


def finetune_settings(params: PipelineParams, baseline: bool = False) -> FinetuneSettings:
    f = params.finetune
    lr = (f.baseline_lr or f.lr) if baseline else f.lr
    return FinetuneSettings(mode="full" if baseline else f.mode, epochs=f.epochs, batch_size=f.batch_size, lr=lr,
                            weight_decay=f.weight_decay, seed=params.seed, augment=f.augment, device=f.device)
