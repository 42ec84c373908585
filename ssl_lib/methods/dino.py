"""DINO (Caron et al., 2021): a student matches the centred, sharpened output of its EMA teacher."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_lib.distributed import mean_across_ranks
from ssl_lib.methods.base import register
from ssl_lib.methods.momentum import cosine_momentum, ema_update, make_target
from ssl_lib.methods.views import TwoViewMethod, ViewOptions, mlp, normalized_embedding_std


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between teacher and student distributions over K prototypes, across views.

    For views v (student logits s_v, teacher logits t_v, each (B, K)) and center c (K,):

        P_t(v) = softmax((t_v - c) / teacher_temp),  log P_s(v) = log_softmax(s_v / student_temp)
        loss = mean over pairs (v, w), v != w, of 1/B sum_b -sum_k P_t(v)_bk log P_s(w)_bk

    Centering (subtracting c) keeps one prototype from dominating; a low ``teacher_temp``
    sharpens the targets so they do not become uniform. The teacher side gets no gradient.
    """
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"need the same number (>= 2) of student and teacher views, got {len(student)} and "
                         f"{len(teacher)}")
    targets = [F.softmax((t.detach().float() - center) / teacher_temp, dim=1) for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=1) for s in student]
    terms = [-(targets[v] * log_probs[w]).sum(dim=1).mean()
             for v in range(len(targets)) for w in range(len(log_probs)) if v != w]
    return torch.stack(terms).mean()


class DINOHead(nn.Module):
    """MLP to an L2-normalized bottleneck, then a linear layer with unit-norm rows to K prototype logits."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden, bottleneck, layers=3)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        # Weight normalization with the norm fixed to 1 (the paper's norm_last_layer=True).
        return F.linear(embedding, F.normalize(self.prototypes, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.embed(x))


@register
class DINO(TwoViewMethod["DINO.Options"]):
    """DINO with two global views: student = head(encoder), teacher = EMA of both (cosine momentum).

    loss = dino((s1, s2), (t1, t2), center, student_temp, teacher_temp); after each loss the center
    moves towards the teacher's batch mean: c <- m_c c + (1 - m_c) mean_b t.
    """

    name = "dino"
    family = "non-contrastive"

    class Options(ViewOptions):
        head_hidden: int = Field(512, ge=1, description="hidden width of the head's MLP")
        bottleneck_dim: int = Field(128, ge=1, description="size of the L2-normalized bottleneck")
        # 1 prototype would make every softmax trivially 1.
        out_dim: int = Field(1024, ge=2, description="number of prototypes (output logits)")
        student_temp: float = Field(0.1, gt=0, description="softmax temperature of the student")
        teacher_temp: float = Field(0.04, gt=0, description="softmax temperature of the teacher (sharpening)")
        # 1 would freeze the center at zero: no centering.
        center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the teacher-output center")
        momentum: float = Field(0.99, ge=0, lt=1, description="starting EMA momentum of the teacher (cosine to 1)")

    center: torch.Tensor  # buffer (register_buffer in __init__)

    def __init__(self, encoder: nn.Module, feature_dim: int, in_channels: int, image_size: int,
                 **options: Any) -> None:
        super().__init__(encoder, feature_dim, in_channels, image_size, **options)
        o = self.options
        self.head = DINOHead(feature_dim, o.head_hidden, o.bottleneck_dim, o.out_dim)
        self.teacher_encoder = make_target(self.encoder)
        self.teacher_head = make_target(self.head)
        self.register_buffer("center", torch.zeros(o.out_dim))

    def loss(self, images: torch.Tensor, targets: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        v1, v2 = self.views(images, generator)
        both = torch.cat([v1, v2])
        embedding = self.head.embed(self.encoder(both))
        s1, s2 = self.head.logits(embedding).chunk(2)
        with torch.no_grad():
            t = self.teacher_head(self.teacher_encoder(both))
        t1, t2 = t.chunk(2)
        o = self.options
        loss = dino_loss((s1, s2), (t1, t2), self.center.clone(), o.student_temp, o.teacher_temp)
        with torch.no_grad():
            m = o.center_momentum
            self.center.mul_(m).add_(mean_across_ranks(t.float().mean(0)), alpha=1 - m)
            teacher_probs = F.softmax((t1.float() - self.center) / o.teacher_temp, dim=1)
            self.last_stats = {
                "embedding_std": normalized_embedding_std(embedding.chunk(2)[0].detach()),
                # Low entropy of the mean teacher output = a few prototypes take everything.
                "teacher_mean_entropy": -(teacher_probs.mean(0) * teacher_probs.mean(0).clamp_min(1e-12).log()).sum(),
            }
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(self.options.momentum, step, total_steps)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
