"""A run's plan, made before any compute: the data it will see, the steps of each stage, and the minutes they
will take on this machine, estimated from a short timed probe of the real training steps.

The steps come from the same rules the stages apply (``ssl_lib.sizing``), so the plan states what the stages
will run. A budget in minutes scales the two budgets that dominate a run, pretraining's and self-training's
images seen, down to fit before the run starts (``fit_to_budget``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ssl_lib import sizing
from ssl_lib.config import PipelineParams
from ssl_lib.errors import ConfigError
from ssl_lib.pretrain_plan import pretraining_pool_size

# Start-up and bookkeeping around the stages (processes, Prefect, DVC, MLflow, model logging, figures), measured
# on the default run on a 2-core CPU (docs/performance.md); a constant, since it barely depends on the data.
OVERHEAD_SECONDS = 75.0
PROBE_STEPS = 5  # timed steps per probe (their median), after one warm-up step


@dataclass(frozen=True)
class DataShape:
    """What a run will see of its data, known from the source's listing before ingest decodes anything."""

    images: int
    pretrain_pool: int  # every non-test image
    self_train_pool: int  # unlabeled + labeled
    labeled: int
    val: int
    test: int
    num_classes: int
    height: int
    width: int
    channels: int

    @classmethod
    def from_splits(cls, splits: np.ndarray, num_classes: int, height: int, width: int,
                    channels: int) -> DataShape:
        """The shape of data whose images carry the split names in ``splits`` (one per image)."""
        def count(*names: str) -> int:
            return int(np.isin(splits, names).sum())

        return cls(images=len(splits), pretrain_pool=count("unlabeled", "labeled", "val"),
                   self_train_pool=count("unlabeled", "labeled"), labeled=count("labeled"), val=count("val"),
                   test=count("test"), num_classes=num_classes, height=height, width=width, channels=channels)


@dataclass
class StagePlan:
    stage: str
    steps: int
    batch_size: int
    epochs: float | None  # passes over the stage's pool (per method and round for self-training)
    seconds_per_step: float | None = None  # from the probe
    other_seconds: float = 0.0  # work outside the training steps (features, graphs, evaluation)

    @property
    def seconds(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return self.steps * self.seconds_per_step + self.other_seconds


@dataclass
class RunPlan:
    data: DataShape
    stages: list[StagePlan]
    overhead_seconds: float = OVERHEAD_SECONDS
    probed: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. what a budget in minutes scaled

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    @property
    def total_seconds(self) -> float | None:
        if not self.probed:
            return None
        return sum(s.seconds or 0.0 for s in self.stages) + self.overhead_seconds

    def rows(self) -> list[dict[str, Any]]:
        """One row per stage: steps, batch, passes and estimated minutes (rounded for people)."""
        return [{"stage": s.stage, "steps": s.steps, "batch": s.batch_size,
                 "passes": None if s.epochs is None else round(s.epochs, 2),
                 "estimated_minutes": None if s.seconds is None else round(s.seconds / 60, 2)} for s in self.stages]

    def describe(self) -> str:
        """The plan in a few lines, for the first lines of a run and for `sslpipe validate`."""
        d = self.data
        lines = [f"plan: {d.images} images of {d.height}x{d.width}x{d.channels} in {d.num_classes} classes; "
                 f"pretraining pool {d.pretrain_pool}, self-training pool {d.self_train_pool}, labeled {d.labeled}, "
                 f"val {d.val}, test {d.test}"]
        for s in self.stages:
            passes = "" if s.epochs is None else f", {s.epochs:.3g} passes"
            minutes = "" if s.seconds is None else f", about {s.seconds / 60:.1f} min"
            lines.append(f"  {s.stage:<11} {s.steps:>6} steps of {s.batch_size}{passes}{minutes}")
        if self.total_seconds is not None:
            lines.append(f"  total about {self.total_seconds / 60:.1f} min on this machine "
                         f"(with {self.overhead_seconds / 60:.1f} min of start-up and tracking)")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def make_plan(params: PipelineParams, data: DataShape) -> RunPlan:
    """The steps each training stage will take on ``data``, by the rules the stages apply."""
    p, f, s = params.pretrain, params.finetune, params.self_train
    pretrain = sizing.pretrain_size(pretraining_pool_size(data.pretrain_pool, p.max_images), p.batch_size,
                                    p.epochs, p.images_seen, p.max_epochs, p.world_size)
    ft_batch = min(f.batch_size, max(data.labeled, 1))
    ft_steps_per_epoch = math.ceil(max(data.labeled, 1) / ft_batch)
    # The SSL model's LP (head only) and full epochs, then the baseline's.
    ft_steps = ft_steps_per_epoch * (f.lp_epochs + f.epochs + (f.baseline_epochs or f.epochs + f.lp_epochs))
    methods = len(s.steps)
    if methods and s.rounds:
        st = sizing.self_train_size(data.self_train_pool, s.batch_size, s.epochs, s.images_seen, s.max_epochs,
                                    s.rounds, methods)
        self_train = StagePlan("self_train", st.steps, st.batch_size, st.epochs)
    else:
        self_train = StagePlan("self_train", 0, s.batch_size, None)
    return RunPlan(data, [StagePlan("pretrain", pretrain.steps, pretrain.batch_size, pretrain.epochs),
                          StagePlan("finetune", ft_steps, ft_batch, float(f.epochs)),
                          self_train,
                          StagePlan("evaluate", 0, 512, None)])


# ---------------------------------------------------------------------------------------------- the probe

def _median_after_first(seconds: list[float]) -> float:
    """The median of per-step times, the first (warm-up: allocations, kernel choice) left out."""
    rest = sorted(seconds[1:]) or seconds
    return rest[len(rest) // 2]


def _random_images(count: int, data: DataShape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, data.height, data.width, data.channels), dtype=np.uint8)


def probe(plan: RunPlan, params: PipelineParams, steps: int = PROBE_STEPS) -> RunPlan:
    """Time a few real steps of each training stage on random images of the data's shape, on this machine, and
    fill in the plan's minutes. Touches no file and leaves torch's global random state as it was."""
    import torch  # here, not at the top: reading a plan's steps must not cost torch's import

    with torch.random.fork_rng(devices=[]):
        return _probe(plan, params, steps)


def _probe(plan: RunPlan, params: PipelineParams, steps: int) -> RunPlan:
    import torch

    from ssl_lib.classifier import Classifier, FinetuneSettings, build_classifier, train_classifier
    from ssl_lib.pretrain import pretrain
    from ssl_lib.pretrain_plan import PretrainSettings, make_pseudo_labels
    from ssl_lib.self_train import SelfTrainSettings, _features_and_probs, self_train

    data, p = plan.data, params.pretrain
    mean, std = [0.5] * data.channels, [0.25] * data.channels
    pre = plan.stage("pretrain")
    images = _random_images(pre.batch_size * (1 + steps), data)
    # The stage's settings on these images, one pass at the plan's batch; compiling would time the compiler.
    settings = replace(PretrainSettings.from_params(params, len(images)), epochs=1, batch_size=pre.batch_size, seed=0,
                       max_images=None, compile=False, checkpoint_every=0)
    stamps = [time.perf_counter()]
    pretrain(images, mean, std, make_pseudo_labels(settings, len(images)), settings, progress=False,
             on_step=lambda _: stamps.append(time.perf_counter()))
    pre.seconds_per_step = _median_after_first(np.diff(stamps).tolist())

    num_classes = max(data.num_classes, 2)

    def new_classifier() -> Classifier:
        return build_classifier(p.backbone, data.channels, data.height, num_classes, mean, std)

    labels = np.arange(max(data.labeled, 2)) % num_classes
    ft = plan.stage("finetune")
    images = _random_images(ft.batch_size, data)  # one step an epoch
    # Plain full training (the baseline's: random head, no linear probe), one step an epoch.
    ft_settings = replace(FinetuneSettings.from_params(params, data.height, baseline=True), epochs=1 + steps,
                          batch_size=ft.batch_size, lr=1e-3, weight_decay=0.0, seed=0)
    _, history = train_classifier(new_classifier(), images, np.resize(labels, len(images)), None, None,
                                  ft_settings, progress=False)
    ft.seconds_per_step = _median_after_first([row["seconds"] for row in history])
    model = new_classifier().eval()
    forward_images = torch.from_numpy(_random_images(1024, data)).permute(0, 3, 1, 2).contiguous()
    _features_and_probs(model, forward_images[:64])  # warm-up
    start = time.perf_counter()
    _features_and_probs(model, forward_images)
    forward_per_image = (time.perf_counter() - start) / len(forward_images)
    # Validation after every epoch: LP, full and baseline epochs over the val images.
    f = params.finetune
    ft.other_seconds = forward_per_image * data.val * (2 * f.lp_epochs + 2 * f.epochs)

    st = plan.stage("self_train")
    s = params.self_train
    if st.steps:
        images = _random_images(st.batch_size, data)  # one step an epoch
        st_settings = replace(SelfTrainSettings.from_params(params, len(images), num_classes, data.height),
                              steps=("label_propagation",), rounds=1, epochs=float(1 + steps),
                              batch_size=st.batch_size, bn_recalibration=0, seed=0)
        result = self_train(new_classifier(), images, np.arange(len(labels)) % len(images), labels,
                            images[:2], labels[:2], st_settings, progress=False)
        st.seconds_per_step = _median_after_first([row["seconds"] for row in result.history])
        runs = s.rounds * len(s.steps)
        # Per method and round: the teacher's features over the pool, the graph, BatchNorm re-estimation and the
        # epochs' val measurements.
        st.other_seconds = forward_per_image * runs * (3.2 * data.self_train_pool
                                                       + s.bn_recalibration * st.batch_size)
    else:
        st.seconds_per_step = 0.0
    # Evaluation: three classifiers on the test images, kNN features of five models over labeled, val and test.
    ev = plan.stage("evaluate")
    ev.seconds_per_step = 0.0
    ev.other_seconds = forward_per_image * (3 * data.test + 5 * (data.labeled + data.val + data.test))
    plan.probed = True
    return plan


def fit_to_budget(plan: RunPlan, params: PipelineParams, minutes: float) -> dict[str, Any]:
    """The overrides that bring a probed plan within ``minutes``: pretraining's and self-training's images seen
    (or their explicit epochs) scaled down by one factor. Empty when the plan fits already.

    Raises ConfigError when even no pretraining and no self-training would not fit: fine-tuning, evaluation and
    start-up are the floor.
    """
    total = plan.total_seconds
    if total is None:
        raise ConfigError("plan.budget_minutes needs the timed probe of the steps: set plan.probe: true"
                          + (f" ({plan.notes[-1]})" if plan.notes else ""))
    budget = minutes * 60.0
    if total <= budget:
        return {}
    scalable = (plan.stage("pretrain").seconds or 0.0) + (plan.stage("self_train").seconds or 0.0)
    floor = total - scalable
    if floor >= budget or scalable <= 0:
        raise ConfigError(f"plan.budget_minutes={minutes:g} is below the {floor / 60:.1f} min that fine-tuning, "
                          f"evaluation and start-up take here: raise plan.budget_minutes (or lower finetune.epochs)")
    factor = (budget - floor) / scalable
    overrides: dict[str, Any] = {}
    pre, st = plan.stage("pretrain"), plan.stage("self_train")
    p, s = params.pretrain, params.self_train
    if p.epochs is not None:
        overrides["pretrain.epochs"] = max(1, math.floor(p.epochs * factor))
    else:
        overrides["pretrain.images_seen"] = max(1, math.floor(pre.steps * pre.batch_size * factor))
    if st.steps:
        if s.epochs is not None:
            overrides["self_train.epochs"] = round(s.epochs * factor, 4)
        else:
            overrides["self_train.images_seen"] = max(1, math.floor(st.steps * st.batch_size * factor))
    return overrides


def rescaled(plan: RunPlan, params: PipelineParams, overrides: dict[str, Any], minutes: float) -> RunPlan:
    """``plan`` redone with the budget's overrides, keeping the probe's step times."""
    from ssl_lib.config import apply_overrides, parse_params

    new_params = parse_params(apply_overrides(params.model_dump(mode="json"), overrides))
    new = make_plan(new_params, plan.data)
    for old_stage, new_stage in zip(plan.stages, new.stages, strict=True):
        new_stage.seconds_per_step = old_stage.seconds_per_step
        new_stage.other_seconds = old_stage.other_seconds
    new.probed = plan.probed
    new.notes = [f"scaled to plan.budget_minutes={minutes:g}: "
                 + ", ".join(f"{k}={v}" for k, v in overrides.items())]
    return new


def plan_run(params: PipelineParams, data: DataShape) -> tuple[RunPlan, dict[str, Any]]:
    """The run's plan (probed when ``plan.probe``), and the overrides that fit it to ``plan.budget_minutes``."""
    plan = make_plan(params, data)
    if params.plan.probe:
        try:
            plan = probe(plan, params)
        except Exception as err:  # noqa: BLE001 - the estimate is a courtesy: the stages raise on a real problem
            plan.notes.append(f"no minutes: timing the steps failed ({type(err).__name__}: {err})")
    minutes = params.plan.budget_minutes
    if minutes is None:
        return plan, {}
    overrides = fit_to_budget(plan, params, minutes)
    return (rescaled(plan, params, overrides, minutes) if overrides else plan), overrides
