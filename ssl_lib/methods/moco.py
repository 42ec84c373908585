"""MoCo v2 (He et al., 2020; Chen et al., 2020): match a query to its momentum-encoded key among queued negatives."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.distributed import gather_no_grad
from ssl_lib.methods.base import register
from ssl_lib.methods.momentum import ema_update, make_target
from ssl_lib.methods.views import TwoViewMethod, ViewOptions, mlp, normalized_embedding_std


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of B queries against their keys, with the K queued keys as negatives.

    With u_i = q_i / ||q_i||, v_i = k_i / ||k_i|| and n_j = queue_j / ||queue_j||:

        loss = 1/B sum_i -log( exp(u_i . v_i / t) / (exp(u_i . v_i / t) + sum_j exp(u_i . n_j / t)) )

    i.e. a (K + 1)-way classification of the positive key. Gradients flow into ``q`` only when
    ``k`` and ``queue`` are detached, as MoCo passes them.
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"need q, k of shape (B, D) and queue (K, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(queue.shape)}")
    u = F.normalize(q.float(), dim=1)
    v = F.normalize(k.float(), dim=1)
    n = F.normalize(queue.float(), dim=1)
    positive = (u * v).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, u @ n.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(u), dtype=torch.long, device=u.device))


@register
class MoCo(TwoViewMethod["MoCo.Options"]):
    """MoCo v2: query encoder f_q = projector(encoder), key encoder f_k an EMA of f_q (``momentum``).

    loss = info_nce(f_q(v1), f_k(v2), queue, t), symmetrized with (v2, v1) when ``symmetric``; the
    keys of the batch then replace the oldest ``queue_size`` entries. The queue starts as random
    unit vectors. Keep ``queue_size`` well below the number of training images, or images meet
    stale keys of themselves among the negatives.
    """

    name = "moco"
    family = "contrastive"

    class Options(ViewOptions):
        temperature: float = Field(0.2, gt=0, description="softmax temperature of InfoNCE")
        proj_dim: int = Field(128, ge=1, description="output size of the projection head")
        proj_hidden: int = Field(512, ge=1, description="hidden width of the projection head")
        queue_size: int = Field(4096, ge=1, description="queued keys used as negatives; keep it below the pool size")
        # 1 would freeze the key encoder at its random init.
        momentum: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the key encoder")
        symmetric: bool = Field(True, description="also score (v2, v1), so both views act as queries")

    queue: torch.Tensor  # buffers (register_buffer in __init__)
    queue_ptr: torch.Tensor

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        hidden, out, size = self.options.proj_hidden, self.options.proj_dim, self.options.queue_size
        self.projector = mlp(feature_dim, hidden, out)
        self.key_encoder = make_target(self.encoder)
        self.key_projector = make_target(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(size, out), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = keys[-len(self.queue):]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[idx] = F.normalize(keys.float(), dim=1).to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.views(images, generator)
        t = self.options.temperature
        q1, q2 = self.projector(self.encoder(torch.cat([v1, v2]))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.key_projector(self.key_encoder(torch.cat([v1, v2]))).chunk(2)
        queue = self.queue.clone()  # enqueueing below must not change what backward needs
        if self.options.symmetric:
            loss = (info_nce_loss(q1, k2, queue, t) + info_nce_loss(q2, k1, queue, t)) / 2
            self._enqueue(torch.cat([gather_no_grad(k2), gather_no_grad(k1)]))
        else:
            loss = info_nce_loss(q1, k2, queue, t)
            self._enqueue(gather_no_grad(k2))
        with torch.no_grad():
            self.last_stats = {"embedding_std": normalized_embedding_std(q1.detach())}
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        m = self.options.momentum
        ema_update(self.key_encoder, self.encoder, m)
        ema_update(self.key_projector, self.projector, m)
