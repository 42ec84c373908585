"""Pretraining throughput, ours against lightly's implementation of the same method, side by side in one run.

For every (model, method) pair it trains both implementations on the same Fashion-MNIST images (the first
``--images`` training images, 28x28 grayscale), with the same backbone (``build_backbone``, initialised from
the same seed), the same batch size, the same optimizer (AdamW) and the same ``torch.set_num_threads``:

* ours: ``ssl_lib.engine``'s ``build_model``, ``make_engine`` and ``train_step``, the functions
  ``ssl_lib.pretrain`` runs - the images live on the device as one uint8 tensor (``ssl_lib.batches``), a batch
  is an index gather plus ``.float().div_(255)``, the loss augments the two views batched on the device, under
  the precision, memory layout and compile that ``ssl_lib.acceleration`` picks for the device (``--precision``,
  ``--channels-last``, ``--compile``; on a CPU fp32, channels_last, no compile), AdamW with the decay/no-decay
  groups, LR schedule, ``model.after_step`` (BYOL's EMA).
* lightly: as in lightly's examples (examples/pytorch/simclr.py, byol.py) - a torch DataLoader over PIL
  grayscale images with ``SimCLRTransform`` / ``BYOLTransform`` (per-sample torchvision transforms),
  ``SimCLRProjectionHead`` + ``NTXentLoss``, or BYOL's heads, ``NegativeCosineSimilarity``,
  ``update_momentum`` on a ``cosine_schedule``; one forward per view, default memory format. Its view
  settings and head sizes are set to ours (crop scale, jitter strengths, no hue/blur/solarize, temperature,
  512-wide hidden layers, 128-d output); normalisation is its transform's ``normalize`` with our mean/std.

How it is measured. Each side first runs ``--warmup`` untimed steps, then ``--steps`` timed steps, split into
``--rounds`` blocks that alternate between the sides (ABBA order) so that background load hits both alike.
Every step is timed wall-clock from fetching the batch to the end of the step (on CUDA after a synchronize):
the optimizer step, and for ours also ``after_step`` (BYOL's EMA) and the LR schedule; lightly's BYOL does its
EMA update before the forward, as in its example, so it is inside the step as well. Ours compiles (where it
does) during its warm-up steps. "data+aug" is, for lightly, the time spent waiting on the DataLoader iterator (PIL
decode, per-sample transforms, collate; with workers only what the workers did not hide) plus the copy to
the device; for ours, the index gather and uint8->float conversion plus the time inside every
``augment_views`` call the step makes (each call is wrapped with a clock, and a CUDA synchronize, for the
step's duration). "fwd+bwd+opt" is the rest of the step. With DataLoader workers, every block starts with a
fresh iterator and one untimed priming step; the workers' start-up is not timed, and the batches they
prefetch during that step slightly favour lightly.
Images/s is the batch size over the median step time; the other columns are medians over the timed steps.

Utilisation. Each side's first warm-up step runs under ``torch.utils.flop_counter.FlopCounterMode`` (untimed):
"GFLOP/step" is what it counts over the whole step, forward and backward (matmuls and convolutions; the
optimizer, elementwise ops and normalisation count nothing), "GFLOP/s" that over the median step time, and
"% of peak" that over the machine's measured peak: the faster of a large square matmul (4096 on a CPU, 8192 on
CUDA) and a large 3x3 convolution (``PEAK_CONV``, channels_last), in our step's precision (fp32 on a CPU, bf16 on
CUDA), at the same thread count, each timed before and after the rows in the same run (median of
``--peak-reps`` each; the highest of the four is the peak). The convolution is there because the BLAS is not
always the fastest library: on this project's AMD EPYC machines MKL's sgemm runs well below oneDNN's
convolutions, and a matmul-only peak put the ResNet-18 steps above 100 %. Both sides share the process, and
with it the allocator setting ours' engine makes on a CPU (``acceleration.keep_freed_memory``). A side that compiles
compiles on the warm-up step after the counted one (Dynamo does not compile under the counter).

Variants (``--variants``): extra rows of ours with another memory layout or compile (``VARIANTS``), timed in
the same alternating blocks as the other sides, so that eager, compiled, channels_last and contiguous steps
are compared in one run; ``--variant-models`` limits them to some models (compiling ResNet-18 takes minutes).
Peak memory on CPU is the process's peak resident set during that side's timed steps (the peak is reset with
/proc/self/clear_refs before each block, after a malloc_trim); it includes what both sides share (the
interpreter, torch, the data, both models), so "step MB" - the peak minus the resident set at the start of
the block - is the part the training step itself needs. DataLoader worker processes are not counted. On CUDA
both are torch's allocated tensor memory instead.

    .venv/bin/python benchmarks/throughput.py                                   # convnet and resnet18, batch 256
    .venv/bin/python benchmarks/throughput.py --models convnet --warmup 2 --steps 5 --lightly-workers 0
    .venv/bin/python benchmarks/throughput.py --quick                           # smoke run, seconds
    .venv/bin/python benchmarks/throughput.py --variants contiguous,compile --variant-models convnet --steps resnet18=2
    .venv/bin/python benchmarks/throughput.py --device cuda --precision bf16 --channels-last on --compile on

Without lightly installed (``pip install -e '.[bench]'``) it measures ours alone.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_lib.acceleration import PRECISIONS, Acceleration, resolve_acceleration
from ssl_lib.batches import DeviceBatches
from ssl_lib.data.idx import read_idx
from ssl_lib.data.sources import DEBIAN_FASHION_MNIST_DIR
from ssl_lib.device import select_device
from ssl_lib.engine import build_model, make_engine, train_step
from ssl_lib.errors import ConfigError
from ssl_lib.io import atomic_path
from ssl_lib.methods import get_method
from ssl_lib.models.backbones import build_backbone

# (warm-up, timed) steps per side when --warmup/--steps are not given; ResNet-18 takes ~20 s a step on 2 cores.
DEFAULT_STEPS: dict[str, tuple[int, int]] = {"convnet": (3, 10), "resnet18": (1, 3)}
FALLBACK_STEPS = (2, 5)
LR, WEIGHT_DECAY = 3e-3, 1e-4  # params.yaml's pretrain values; they do not change the cost of a step
WARMUP_FRACTION = 0.05
METHODS = ("simclr", "byol")
# Extra rows of ours (--variants): the step's precision stays; memory layout and compile are set per variant.
VARIANTS: dict[str, dict[str, bool]] = {
    "contiguous": {"channels_last": False, "compile": False},
    "channels_last": {"channels_last": True, "compile": False},
    "compile": {"channels_last": True, "compile": True},
    "compile-contiguous": {"channels_last": False, "compile": True},
}
# Side of the square matmul, and (batch, channels, side) of the 3x3 convolution, that measure the peak: large enough
# to run at their library's full rate.
PEAK_SIZE = {"cpu": 4096, "cuda": 8192}
PEAK_CONV = {"cpu": (256, 256, 14), "cuda": (256, 512, 28)}
QUICK_PEAK_CONV = (16, 64, 14)


class Clock:
    """perf_counter that first waits for queued CUDA work, so a reading covers what was launched before it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class StepTime:
    total: float
    data_aug: float | None  # None: nothing was instrumented (e.g. augmentation moved out of augment_views)


class Runner(Protocol):
    """One implementation's training loop, stepped from outside so that the sides can take turns."""

    label: str
    compiles: bool  # its first un-counted step compiles, so it must be a warm-up step

    def start_block(self) -> None: ...

    def step(self) -> StepTime: ...

    def end_block(self) -> None: ...


# --------------------------------------------------------------------------- data


def load_images(data_dir: Path, count: int) -> np.ndarray:
    """The first ``count`` Fashion-MNIST training images, uint8 NHWC (N, 28, 28, 1)."""
    for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
        if (data_dir / name).exists():
            return read_idx(data_dir / name, expected_ndim=3)[:count, :, :, None]
    raise SystemExit(f"no train-images-idx3-ubyte(.gz) in {data_dir}; install dataset-fashion-mnist or pass --data-dir")


def mean_std(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale, for both sides' normalisation."""
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 1, 2)).tolist(), x.std(axis=(0, 1, 2)).tolist()


class PILDataset(torch.utils.data.Dataset):
    """uint8 NHWC grayscale images served as PIL "L" images through ``transform``, as a torchvision dataset does."""

    def __init__(self, images: np.ndarray, transform: Callable[[Any], Any]) -> None:
        self.images = images[..., 0]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[index])), 0  # 2-D uint8 -> mode "L"


# --------------------------------------------------------------------------- ours


class AugmentTimer:
    """Adds the duration of every ``augment_views`` call of ours to a list, while ``active``.

    The methods import ``augment_views`` by name, so the name is swapped in each ``ssl_lib`` module that
    holds it (found once, after the methods are imported) and put back afterwards.
    """

    def __init__(self, clock: Clock) -> None:
        import ssl_lib.augment as augment

        self.clock = clock
        self.original = augment.augment_views
        self.modules = [mod for name, mod in list(sys.modules.items())
                        if name.startswith("ssl_lib") and getattr(mod, "augment_views", None) is self.original]

    @contextlib.contextmanager
    def active(self, spent: list[float]) -> Iterator[None]:
        original, clock = self.original, self.clock

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            start = clock()
            out = original(*args, **kwargs)
            spent.append(clock() - start)
            return out

        for mod in self.modules:
            mod.augment_views = timed
        try:
            yield
        finally:
            for mod in self.modules:
                mod.augment_views = original


class OursRunner:
    """The engine's step, as ``ssl_lib.pretrain`` runs it."""

    def __init__(self, method: str, backbone: str, images: np.ndarray, mean: list[float], std: list[float],
                 batch_size: int, device: torch.device, seed: int, total_steps: int, accel: Acceleration,
                 label: str = "ours") -> None:
        self.label, self.compiles = label, accel.compile
        self.clock = Clock(device)
        self.source = DeviceBatches(images, device)
        self.n, self.batch_size = len(images), batch_size
        model, _, _ = build_model(method, backbone, {}, mean, std, int(images.shape[3]), int(images.shape[1]), seed,
                                  device, accel)
        model.train()
        self.engine = make_engine(model, accel, device, total_steps, "adamw", LR, WEIGHT_DECAY, WARMUP_FRACTION)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = self._batches()
        self.steps_done = 0
        self.augment_timer = AugmentTimer(self.clock)

    def _batches(self) -> Iterator[torch.Tensor]:
        steps = self.n // self.batch_size  # pretrain drops the ragged batch
        while True:
            order = torch.randperm(self.n, generator=self.generator)
            for _, _, batch in self.source.batches(order, self.batch_size, slice(None), 0, steps):
                yield batch

    def start_block(self) -> None:
        pass

    def end_block(self) -> None:
        pass

    def step(self) -> StepTime:
        spent: list[float] = []
        start = self.clock()
        images = next(self.batches).float().div_(255.0)
        gathered = self.clock()
        with self.augment_timer.active(spent):
            train_step(self.engine, images, {}, self.generator, self.steps_done)
        end = self.clock()
        self.steps_done += 1
        return StepTime(end - start, (gathered - start) + sum(spent) if spent else None)


# --------------------------------------------------------------------------- lightly


class LightlySimCLR(nn.Module):
    """lightly's examples/pytorch/simclr.py model, on our backbone and our head sizes."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden: int, out: int) -> None:
        from lightly.models.modules.heads import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class LightlyBYOL(nn.Module):
    """lightly's examples/pytorch/byol.py model, on our backbone and our head sizes."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden: int, out: int, pred_hidden: int) -> None:
        import copy

        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, hidden, out)
        self.prediction_head = BYOLPredictionHead(out, pred_hidden, out)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def lightly_transform(method: str, options: dict[str, Any], size: int, mean: list[float], std: list[float]) -> Any:
    """lightly's per-sample two-view transform with our view settings.

    Grayscale PIL images go through as they are (hue and saturation jitter and RandomGrayscale leave "L"
    images alone); only ``normalize`` needs our one-channel mean/std, ImageNet's three would not broadcast.
    """
    strength = float(options["jitter_strength"])
    view = dict(input_size=size, cj_prob=float(options["jitter_p"]), cj_strength=1.0, cj_bright=strength,
                cj_contrast=strength, cj_sat=strength, cj_hue=0.0, min_scale=float(options["crop_scale_min"]),
                random_gray_scale=float(options["grayscale_p"]), gaussian_blur=float(options["blur_p"]),
                normalize={"mean": mean, "std": std})
    if method == "simclr":
        from lightly.transforms import SimCLRTransform

        return SimCLRTransform(**view)
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    solarize = float(options["solarize_p"])
    return BYOLTransform(BYOLView1Transform(**view, solarization_prob=solarize),
                         BYOLView2Transform(**view, solarization_prob=solarize))


class LightlyRunner:
    """lightly's training step: DataLoader with per-sample transforms, one forward per view."""

    def __init__(self, method: str, backbone: str, images: np.ndarray, mean: list[float], std: list[float],
                 batch_size: int, device: torch.device, seed: int, total_steps: int, workers: int) -> None:
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss

        self.label, self.compiles = f"lightly (workers={workers})", False
        self.method, self.device, self.workers, self.total_steps = method, device, workers, total_steps
        self.clock = Clock(device)
        options = get_method(method).Options().model_dump()  # the defaults, as a plain dict
        channels, size = images.shape[3], images.shape[1]
        dataset = PILDataset(images, lightly_transform(method, options, size, mean, std))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                                  num_workers=workers,
                                                  generator=torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same encoder weights as ours: the encoder is built first on both sides
            encoder, feature_dim = build_backbone(backbone, channels, size)
            hidden, out = int(options["proj_hidden"]), int(options["proj_dim"])
            if method == "simclr":
                self.model: nn.Module = LightlySimCLR(encoder, feature_dim, hidden, out)
                self.criterion: nn.Module = NTXentLoss(temperature=float(options["temperature"]))
            else:
                self.model = LightlyBYOL(encoder, feature_dim, hidden, out, int(options["pred_hidden"]))
                self.criterion = NegativeCosineSimilarity()
        self.momentum = float(options.get("momentum", 0.99))
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.iterator: Iterator[Any] | None = None
        self.steps_done = 0

    def start_block(self) -> None:
        if self.workers > 0:
            # Fresh workers per block, so that they do not prefetch while the other side is being timed.
            self.iterator = iter(self.loader)
            self.step()  # untimed: absorbs the workers' start-up
        elif self.iterator is None:
            self.iterator = iter(self.loader)

    def end_block(self) -> None:
        if self.workers > 0:
            self.iterator = None  # shuts the workers down

    def _next_batch(self) -> Any:
        assert self.iterator is not None, "start_block() first"
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def _loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if self.method == "simclr":
            return self.criterion(self.model(x0), self.model(x1))
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(self.steps_done, self.total_steps, self.momentum, 1.0)
        update_momentum(self.model.backbone, self.model.backbone_momentum, m=m)
        update_momentum(self.model.projection_head, self.model.projection_head_momentum, m=m)
        p0, z0 = self.model(x0), self.model.forward_momentum(x0)
        p1, z1 = self.model(x1), self.model.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def step(self) -> StepTime:
        start = self.clock()
        (x0, x1), _ = self._next_batch()
        x0, x1 = x0.to(self.device), x1.to(self.device)
        loaded = self.clock()
        loss = self._loss(x0, x1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        end = self.clock()
        self.steps_done += 1
        return StepTime(end - start, loaded - start)


# --------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one block: RSS high-water mark on CPU, allocated tensor memory on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or self._reset_rss_peak()
        self.start_mb = 0.0

    @staticmethod
    def _reset_rss_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            return _vm_hwm_mb() is not None
        except OSError:
            return False

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
            return
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            # Hand memory the other side freed back to the OS, or its cached pages would count as our peak.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start_mb = _rss_mb()
        if self.resettable:
            self._reset_rss_peak()

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable:
            return _vm_hwm_mb() or 0.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # cumulative: see the note it adds


def gpu_utilization(device: torch.device) -> float | None:
    """Current GPU utilization in %, or None (CPU run, or no pynvml)."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # torch raises ModuleNotFoundError / RuntimeError variants without pynvml
        return None


# --------------------------------------------------------------------------- utilisation


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (a whole training step: forward and backward), as torch's FlopCounterMode
    counts them: matmuls, convolutions and attention, forward and backward; elementwise ops, normalisation and
    the optimizer count nothing. The counter's dispatch mode makes Dynamo skip compiled frames, so a compiled
    model runs (and is counted) eagerly here, with the same FLOPs as its compiled graph."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _median_seconds(clock: Clock, op: Callable[[], Any], reps: int) -> float:
    op()  # untimed: the first call pays for allocation and kernel selection
    times = []
    for _ in range(max(1, reps)):
        start = clock()
        op()
        times.append(clock() - start)
    return statistics.median(times)


def machine_peak(device: torch.device, dtype: torch.dtype, size: int, conv: tuple[int, int, int],
                 reps: int) -> dict[str, float]:
    """FLOP/s of the two friendliest ops there are, in ``dtype`` on ``device`` at the current thread count, the
    median of ``reps`` timed runs each: a ``size`` x ``size`` matmul (the BLAS) and a 3x3 convolution of a
    channels_last (batch, channels, side) ``conv`` batch, channels in = out (oneDNN / cuDNN). Either library can
    be the faster: on an AMD EPYC, MKL's sgemm reaches 120-130 GFLOP/s on 2 cores, oneDNN's convolutions 150-190."""
    clock = Clock(device)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    out = torch.empty_like(a)
    matmul = 2 * size**3 / _median_seconds(clock, lambda: torch.mm(a, b, out=out), reps)
    batch, channels, side = conv
    x = torch.randn(batch, channels, side, side, generator=generator).to(device, dtype)
    w = torch.randn(channels, channels, 3, 3, generator=generator).to(device, dtype)
    x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    flops = 2 * batch * channels * channels * 9 * side * side
    convolution = flops / _median_seconds(clock, lambda: torch.nn.functional.conv2d(x, w, padding=1), reps)
    return {"matmul": matmul, "conv": convolution}


# --------------------------------------------------------------------------- measurement


@dataclass
class SideResult:
    label: str
    flops: int = 0  # of one step, counted on the first warm-up step
    steps: list[StepTime] = field(default_factory=list)
    peaks_mb: list[float] = field(default_factory=list)
    step_mb: list[float] = field(default_factory=list)
    gpu_util: list[float] = field(default_factory=list)


def split_steps(steps: int, rounds: int) -> list[int]:
    """``steps`` spread over ``rounds`` blocks as evenly as possible (no empty blocks)."""
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (1 if i < steps % rounds else 0) for i in range(rounds)]


def measure(runners: list[Runner], warmup: int, steps: int, rounds: int, device: torch.device,
            log: Callable[[str], None]) -> list[SideResult]:
    """Warm every side up, then time ``steps`` steps each in blocks that alternate the order of the sides.

    The first warm-up step (there is always one) is the one whose FLOPs are counted; a side that compiles
    compiles on the step after it, so it gets at least one more warm-up step."""
    results = [SideResult(r.label) for r in runners]
    for runner, result in zip(runners, results, strict=True):
        runner.start_block()
        result.flops = count_flops(runner.step)
        for _ in range(max(warmup - 1, 1 if runner.compiles else 0)):
            runner.step()
        runner.end_block()
    memory = PeakMemory(device)
    for k, block in enumerate(split_steps(steps, rounds)):
        order = list(zip(runners, results, strict=True))
        for runner, result in (order if k % 2 == 0 else order[::-1]):
            runner.start_block()
            memory.start()
            for _ in range(block):
                result.steps.append(runner.step())
            result.peaks_mb.append(memory.peak_mb())
            result.step_mb.append(result.peaks_mb[-1] - memory.start_mb)
            util = gpu_utilization(device)
            if util is not None:
                result.gpu_util.append(util)
            runner.end_block()
            median = statistics.median(s.total for s in result.steps)
            log(f"  {runner.label}: block {k + 1}, {block} steps, median so far {median:.2f} s/step")
    return results


def summarize(model: str, method: str, result: SideResult, batch_size: int, peak_flops: float) -> dict[str, Any]:
    totals = [s.total for s in result.steps]
    step_s = statistics.median(totals)
    row: dict[str, Any] = {"model": model, "method": method, "implementation": result.label,
                           "images_per_s": batch_size / step_s, "step_s": step_s,
                           "gflop_step": result.flops / 1e9, "gflop_s": result.flops / step_s / 1e9,
                           "peak_share": result.flops / step_s / peak_flops,
                           "peak_mb": max(result.peaks_mb), "step_mb": max(result.step_mb),
                           "gpu_util": statistics.median(result.gpu_util) if result.gpu_util else None}
    if all(s.data_aug is not None for s in result.steps):
        data_aug = [s.data_aug for s in result.steps]
        row["data_aug_s"] = statistics.median(data_aug)
        row["compute_s"] = statistics.median(t - a for t, a in zip(totals, data_aug, strict=True))
        row["aug_share"] = sum(data_aug) / sum(totals)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """On each lightly row: ours images/s over that row's, for the same model and method."""
    ours = {(r["model"], r["method"]): r["images_per_s"] for r in rows if r["implementation"] == "ours"}
    for row in rows:
        if row["implementation"] != "ours" and (row["model"], row["method"]) in ours:
            row["ratio"] = ours[(row["model"], row["method"])] / row["images_per_s"]


COLUMNS = [("model", "model", "{}"), ("method", "method", "{}"), ("implementation", "implementation", "{}"),
           ("images_per_s", "images/s (median)", "{:.1f}"), ("step_s", "s/step", "{:.3f}"),
           ("data_aug_s", "s/step data+aug", "{:.3f}"), ("compute_s", "s/step fwd+bwd+opt", "{:.3f}"),
           ("aug_share", "aug share", "{:.0%}"), ("gflop_step", "GFLOP/step", "{:.1f}"),
           ("gflop_s", "GFLOP/s", "{:.1f}"), ("peak_share", "% of peak", "{:.1%}"),
           ("peak_mb", "peak MB", "{:.0f}"), ("step_mb", "step MB", "{:.0f}"),
           ("gpu_util", "GPU util %", "{:.0f}"), ("ratio", "ours / this", "{:.2f}x")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


ANY_MODEL = "*"


def per_model_count(text: str) -> dict[str, int]:
    """``N`` (every model) or ``model=N,...`` (the others keep their defaults), as {model or ANY_MODEL: N}."""
    counts: dict[str, int] = {}
    try:
        for part in _csv(text):
            model, _, count = part.rpartition("=")
            counts[model or ANY_MODEL] = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or model=N,...") from None
    if not counts or min(counts.values()) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or model=N,... with N >= 0")
    return counts


def steps_for(model: str, warmup: dict[str, int] | None, steps: dict[str, int] | None) -> tuple[int, int]:
    """(warm-up, timed) steps of ``model``: what --warmup/--steps give it, else DEFAULT_STEPS."""
    default_warmup, default_steps = DEFAULT_STEPS.get(model, FALLBACK_STEPS)

    def pick(given: dict[str, int] | None, default: int) -> int:
        given = given or {}
        return given.get(model, given.get(ANY_MODEL, default))

    return pick(warmup, default_warmup), pick(steps, default_steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="convnet,resnet18", help="backbones, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="simclr and/or byol")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, the same for both sides")
    parser.add_argument("--warmup", type=per_model_count, default=None,
                        help=f"untimed steps per side: N, or model=N,... (default {DEFAULT_STEPS})")
    parser.add_argument("--steps", type=per_model_count, default=None,
                        help="timed steps per side: N, or per model as convnet=10,resnet18=2")
    parser.add_argument("--rounds", type=int, default=2,
                        help="blocks the timed steps are split into, alternating sides")
    parser.add_argument("--lightly-workers", default="0,2", help="DataLoader num_workers for lightly; one row each")
    parser.add_argument("--images", type=int, default=10000, help="first N Fashion-MNIST training images")
    parser.add_argument("--data-dir", default=str(DEBIAN_FASHION_MNIST_DIR))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="ours' autocast precision")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help="torch.compile ours' encoder (auto: on CUDA only)")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                        help="ours' memory layout (auto: channels_last)")
    parser.add_argument("--variants", default="",
                        help=f"extra rows of ours, comma-separated, timed in the same blocks: {', '.join(VARIANTS)}")
    parser.add_argument("--variant-models", default=None,
                        help="the models that get the --variants rows (default: all of --models)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help=f"side of the matmul that measures the peak FLOP/s (default {PEAK_SIZE})")
    parser.add_argument("--peak-reps", type=int, default=3,
                        help="timed matmuls and convolutions, before and after the rows each")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: convnet, batch 16, 1 warm-up + 1 timed step, 256 images, workers 0, "
                             "peak from a 1024 matmul and a small convolution")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.images, args.rounds = "convnet", 16, 256, 1
        args.warmup, args.steps, args.lightly_workers, args.peak_size = {ANY_MODEL: 1}, {ANY_MODEL: 1}, "0", 1024
    unknown = sorted(set(_csv(args.methods)) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; lightly counterparts exist here for {', '.join(METHODS)}")
    unknown = sorted(set(_csv(args.variants)) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; use {', '.join(VARIANTS)}")
    return args


def _on_off(choice: str) -> bool | None:
    return None if choice == "auto" else choice == "on"


def ours_runners(common: dict[str, Any], accel: Acceleration, variants: list[str]) -> list[Runner]:
    """Ours as configured, then one runner per variant: the same step with another layout or compile."""
    runners: list[Runner] = [OursRunner(**common, accel=accel)]
    for name in variants:
        runners.append(OursRunner(**common, accel=dataclasses.replace(accel, **VARIANTS[name]),
                                  label=f"ours ({name})"))
    return runners


def measure_peak(device: torch.device, dtype: torch.dtype, size: int, conv: tuple[int, int, int], reps: int,
                 log: Callable[[str], None]) -> dict[str, float]:
    peak = machine_peak(device, dtype, size, conv, reps)
    log(f"peak: matmul {peak['matmul'] / 1e9:.1f}, conv {peak['conv'] / 1e9:.1f} GFLOP/s ({dtype}, median of {reps})")
    return peak


def peak_note(peaks: list[dict[str, float]], size: int, conv: tuple[int, int, int], precision: str,
              device: torch.device, reps: int) -> str:
    def timings(op: str) -> str:
        return " / ".join(f"{p[op] / 1e9:.1f}" for p in peaks)

    batch, channels, side = conv
    return (f"peak: {max(max(p.values()) for p in peaks) / 1e9:.1f} GFLOP/s, the fastest of a {size}x{size} "
            f"{precision} matmul and a 3x3 {precision} convolution ({channels} -> {channels} channels, {side}x{side}, "
            f"batch {batch}, channels_last) on {device}, each timed before and after the rows (median of {reps}): "
            f"matmul {timings('matmul')}, conv {timings('conv')}. "
            f"GFLOP/step: one training step's forward and backward as torch's FlopCounterMode counts them "
            f"(matmuls and convolutions); GFLOP/s: that over the median step; % of peak: GFLOP/s over the peak.")


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak MB / step MB: torch.cuda.max_memory_allocated, absolute / above the block's start"
    if not PeakMemory(device).resettable:
        return "peak MB: ru_maxrss, cumulative over the whole process (could not reset the peak here)"
    return ("peak MB: process RSS high-water mark during the side's timed steps (shared baseline included); "
            "step MB: that peak minus the RSS at the block's start; DataLoader workers not counted")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        import lightly
        lightly_version = lightly.__version__
        workers = [int(w) for w in _csv(args.lightly_workers)]
    except ImportError:
        lightly_version, workers = "not installed (pip install -e '.[bench]'): ours only", []
        log(f"lightly {lightly_version}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # lightly's transforms draw from the global RNG
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # e.g. make bench-gpu on a CPU machine
        raise SystemExit(f"throughput: --device {args.device}, but CUDA is not available here "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); run it on a CUDA machine")
    try:
        device = select_device(args.device)
        accel = resolve_acceleration(device, args.precision, channels_last=_on_off(args.channels_last),
                                     compile=_on_off(args.compile))
    except ConfigError as err:  # a device this machine lacks: one line, not a traceback
        raise SystemExit(f"throughput: {err}") from None
    images = load_images(Path(args.data_dir), args.images)
    mean, std = mean_std(images)
    variants, variant_models = _csv(args.variants), _csv(args.variant_models or args.models)
    # The peak in the precision of our step (fp32 on a CPU, bf16 on CUDA), before and after the rows: the
    # higher of the two, so that load during one of them does not flatter the utilisation figures.
    peak_size = args.peak_size or PEAK_SIZE.get(device.type, PEAK_SIZE["cpu"])
    peak_conv = QUICK_PEAK_CONV if args.quick else PEAK_CONV.get(device.type, PEAK_CONV["cpu"])
    peaks = [measure_peak(device, accel.dtype, peak_size, peak_conv, args.peak_reps, log)]

    results: list[tuple[str, str, SideResult]] = []
    for model in _csv(args.models):
        warmup, steps = steps_for(model, args.warmup, args.steps)
        total = warmup + steps + args.rounds  # schedules' length, the workers' priming steps included
        for method in _csv(args.methods):
            log(f"{model} / {method}: {warmup} warm-up + {steps} timed steps per side, batch {args.batch_size}")
            common = dict(method=method, backbone=model, images=images, mean=mean, std=std,
                          batch_size=args.batch_size, device=device, seed=args.seed, total_steps=total)
            runners = ours_runners(common, accel, variants if model in variant_models else [])
            runners += [LightlyRunner(**common, workers=w) for w in workers]
            results += [(model, method, result)
                        for result in measure(runners, warmup, steps, args.rounds, device, log)]
            del runners
    peaks.append(measure_peak(device, accel.dtype, peak_size, peak_conv, args.peak_reps, log))
    peak = max(max(p.values()) for p in peaks)
    rows = [summarize(model, method, result, args.batch_size, peak) for model, method, result in results]
    add_ratios(rows)

    ours_note = f"ours: {accel.precision}, channels_last {accel.channels_last}, compile {accel.compile}"
    if workers:
        ours_note += "; lightly: fp32, default memory format, no compile"
    if variants:
        ours_note += f"; variants of ours: {', '.join(variants)} (on {', '.join(variant_models)})"
    header = (f"device {device}, torch {torch.__version__}, lightly {lightly_version}, threads {args.threads}, "
              f"batch {args.batch_size}, {len(images)} Fashion-MNIST images; medians over the timed steps.\n"
              f"{ours_note}.\n"
              f"{peak_note(peaks, peak_size, peak_conv, accel.precision, device, args.peak_reps)}\n"
              f"data+aug: lightly = DataLoader wait + copy to device, ours = index gather + uint8->float + "
              f"augment_views calls; {memory_note(device)}; ours / this: ours' images/s over that row's (on a "
              f"variant row: ours as configured over that variant's).")
    table = markdown_table(rows)
    print(header + "\n\n" + table)
    if args.out:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
