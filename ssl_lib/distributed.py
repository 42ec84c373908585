"""Data-parallel helpers over ``torch.distributed``: every function is the identity in a single process.

The pretraining loop gives each rank an equal, contiguous slice of the global batch. The helpers here
make a data-parallel step compute what one process would on the whole global batch:

* ``gather_with_grad`` concatenates a tensor across ranks in rank order, so batch-level losses
  (NT-Xent negatives, Barlow Twins' cross-correlation, VICReg's variance/covariance) see the global
  batch. Gradients flow back to each rank's own slice.
* ``CrossRankBatchNorm`` normalizes with statistics over the global batch. ``nn.SyncBatchNorm`` does
  this on GPUs only; this one works on any backend (gloo on CPU included).

Why the gradients come out right: each rank's loss L_r is its share of the global objective
L = mean_r L_r, collective ops backpropagate as sums over ranks, and DDP averages the gradients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_T = TypeVar("_T")


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return RankInfo()
    return RankInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device_type: str) -> RankInfo:
    """Join the process group that ``torchrun`` describes in the environment: NCCL for CUDA, else gloo."""
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return rank_info()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum of per-rank losses w.r.t. the input is again a sum over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class _GatherCat(torch.autograd.Function):
    """Concatenate over ranks; each rank gets back the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # all_reduce + slice is a reduce-scatter that every backend (gloo included) supports.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, autograd-aware (identity in a single process)."""
    return _AllReduceSum.apply(x) if _distributed() else x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 in rank order; autograd-aware."""
    return _GatherCat.apply(x) if _distributed() else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``gather_with_grad`` for tensors that need no gradient (momentum-encoder keys, teacher outputs)."""
    return gather_with_grad(x)


@torch.no_grad()
def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``x`` over ranks (for logging and for state every rank must agree on)."""
    if not _distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def all_gather_objects(obj: _T) -> list[_T]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()  # all_gather_object fills in every rank's object
    dist.all_gather_object(out, obj)
    return out


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm (1d or 2d) whose training statistics cover the global batch across ranks.

    With one process it is exactly ``nn.BatchNorm1d/2d``. With several, the mean and the (biased)
    variance are two all-reduced sums over ranks (two passes, for accuracy), assuming equal local batches.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = all_reduce_sum(x.sum(dims)) / count
        centered = x - mean.view(shape)
        var = all_reduce_sum(centered.square().sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        # Called only with track_running_stats, so the three buffers exist (BatchNorm types them Optional).
        batches, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        assert batches is not None and running_mean is not None and running_var is not None
        batches.add_(1)
        momentum = 1.0 / float(batches) if self.momentum is None else self.momentum
        unbiased = var * count / max(count - 1, 1)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a ``CrossRankBatchNorm`` with the same state (in place)."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, CrossRankBatchNorm):
            replacement = CrossRankBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                             child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            replacement.to(next(iter(child.state_dict().values())).device if child.state_dict() else "cpu")
            if child.affine:
                replacement.weight.requires_grad_(child.weight.requires_grad)
                replacement.bias.requires_grad_(child.bias.requires_grad)
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child)
    return module
