"""Where the data decide: the rules that size a run to the pool and the images at hand.

Each rule is a small pure function, used by the stage that trains and by the plan that predicts it
(``ssl_lib.plan``), so the two never disagree. README "Your own images" lists them:

- **compute, not passes**: pretraining and self-training are given a budget of images seen; the passes over
  the pool follow from its size, up to a cap where more passes over a small pool stop paying;
- **batch size against pool size**: a batch never exceeds an eighth of the pool, so every pass takes at least
  eight optimizer steps (a 1,300-image pool at batch 256 would take five);
- **kNN k against pool size**: the propagation graph's neighbours never outnumber half of an average class's
  share of the pool, so a small pool's graph does not link every image to other classes; the kNN probe's never
  outnumber an average class's labeled images;
- **augmentation against image size and channels**: the supervised shift is about 1/14 of the side (2 px at
  28x28, 1 px at 8x8); colour jitter's saturation and random grayscale act on 3-channel images only
  (``ssl_lib.augment``);
- **image size against compute**: a folder's images are resized to their most common size, scaled down to a longer
  side of 64 px (aspect kept) unless ``data.image_size`` is set;
- **backbone depth against image size**: the ConvNet stops pooling once a map would fall below 3x3
  (``ssl_lib.models.backbones.ConvNet``), so 8x8 digits keep spatial layers as 32x32 images do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_STEPS_PER_PASS = 8
MAX_IMAGE_SIDE = 64  # a folder's images are scaled down to this longer side unless data.image_size says otherwise


def fit_batch_size(requested: int, pool_size: int, multiple: int = 1) -> int:
    """``requested``, or the largest power of two (a multiple of ``multiple``, the processes sharing a batch)
    that gives the pool at least ``MIN_STEPS_PER_PASS`` steps per pass; never below 2 x ``multiple``."""
    cap = pool_size // MIN_STEPS_PER_PASS
    if requested <= cap:
        return requested
    batch = 2 ** max(1, int(math.log2(max(cap, 2))))
    batch -= batch % multiple
    return max(batch, 2 * multiple)


def pretrain_epochs(images_seen: int, pool_size: int, max_epochs: int) -> int:
    """Passes over a pretraining pool of ``pool_size`` that spend ``images_seen``: at least 1, at most
    ``max_epochs`` (whole passes: each epoch has its own pseudo-labels)."""
    return max(1, min(max_epochs, round(images_seen / max(pool_size, 1))))


def self_train_epochs(images_seen: int, pool_size: int, rounds: int, methods: int, max_epochs: float) -> float:
    """Passes over the self-training pool per method and round that spend ``images_seen`` in all rounds, at most
    ``max_epochs``."""
    runs = max(1, rounds * methods)
    return min(max_epochs, images_seen / (runs * max(pool_size, 1)))


def knn_k(requested: int, pool_size: int, num_classes: int) -> int:
    """``requested`` neighbours, or fewer: at most half of an average class's share of the pool (and at least 1)."""
    return max(1, min(requested, pool_size // max(2 * num_classes, 1), pool_size - 1))


def knn_probe_k(requested: int, labeled: int, num_classes: int) -> int:
    """The kNN probe's neighbours among ``labeled`` images: at most an average class's count (at least 1)."""
    return max(1, min(requested, labeled // max(num_classes, 1)))


def shift_px(image_size: int) -> int:
    """The supervised augmentation's largest shift in pixels: about 1/14 of the side, at least 1."""
    return max(1, round(image_size / 14))


def fit_image_size(width: int, height: int, max_side: int = MAX_IMAGE_SIDE) -> tuple[int, int]:
    """A folder's image size (width, height): its most common size, scaled down (aspect kept) to a longer side of
    ``max_side`` when it is larger. Training cost grows with the pixels; small images learn well in these models."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(4, round(width * scale)), max(4, round(height * scale))


@dataclass(frozen=True)
class StageSize:
    """How many passes and steps a training stage takes on its pool."""

    pool_size: int
    batch_size: int
    epochs: float  # passes over the pool (per method and round, for self-training)
    steps: int  # optimizer steps in the whole stage

    @property
    def images_seen(self) -> int:
        return self.steps * self.batch_size


def steps_per_pass(pool_size: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``pool_size`` images: whole batches only (the ragged last batch is
    dropped), at least one."""
    return max(1, pool_size // min(batch_size, max(pool_size, 1)))


def pretrain_size(pool_size: int, batch_size: int, epochs: int | None, images_seen: int, max_epochs: int,
                  world_size: int = 1) -> StageSize:
    """Pretraining's batch, passes and steps: ``epochs`` when set, else the image budget's."""
    batch = fit_batch_size(batch_size, pool_size, world_size)
    passes = epochs if epochs is not None else pretrain_epochs(images_seen, pool_size, max_epochs)
    return StageSize(pool_size, batch, passes, steps_per_pass(pool_size, batch) * passes)


def self_train_size(pool_size: int, batch_size: int, epochs: float | None, images_seen: int, max_epochs: float,
                    rounds: int, methods: int) -> StageSize:
    """Self-training's batch, passes per method and round, and steps over all of them."""
    batch = fit_batch_size(batch_size, pool_size)
    passes = epochs if epochs is not None else self_train_epochs(images_seen, pool_size, rounds, methods,
                                                                 max_epochs)
    return StageSize(pool_size, batch, passes, self_train_steps(passes, pool_size, batch) * rounds * methods)


def self_train_steps(epochs: float, pool_size: int, batch_size: int) -> int:
    """Optimizer steps of one method in one round: ``epochs`` passes of whole batches, at least one step."""
    # Floor, with a hair of slack for epochs computed from a budget (2.0000001 passes are 2 passes' steps).
    return max(1, math.floor(epochs * steps_per_pass(pool_size, batch_size) + 1e-6))
