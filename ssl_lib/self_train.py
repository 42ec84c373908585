"""Semi-supervised training after fine-tuning: the unlabeled pool teaches the classifier.

A round turns a teacher into a student through one or more steps, each of which trains the model
further on the pool (unlabeled + labeled images; never val or test) plus the labeled set:

- ``label_propagation`` (Iscen et al., 2019): a kNN graph of the teacher's features spreads the few
  labels over the pool by diffusion, the result rebalanced (Sinkhorn) to the labeled set's class shares
  (``balance``); each pool image gets the propagated class, weighted by its certainty (1 - entropy / log C)
  and by the inverse frequency of that class.
- ``distill`` (SimCLRv2): the teacher's soft predictions on the pool (at ``temperature``) are the targets.
- ``fixmatch`` (Sohn et al., 2020): the EMA model's prediction on a weak view (shift + flip) becomes a
  hard pseudo-label where its confidence reaches ``threshold``; the student learns it on a strong view
  (affine, jitter, cutout), optionally with distribution alignment (ReMixMatch).

The static targets of the first two are computed once per step; fixmatch's are computed per batch. In every
step the loss is CE(labeled, weak view) + unlabeled_weight * mean_i(w_i * CE(pool_i, strong view, target_i)),
and the weights kept are an exponential moving average of the student's, which becomes the next teacher.
All randomness comes from ``settings.seed``: two CPU runs with the same thread count are identical.

Self-training can also make a model worse (a small pool, a poor teacher). So every round's model is a candidate
next to the fine-tuned model it started from, and ``choose_final`` keeps the last round unless an earlier
candidate leads it on the labeled val images (never test) by more than ``selection_margin``. The fine-tune's
val accuracy counts less its optimism (``ssl_lib.classifier.val_optimism``): its epoch was chosen on those images.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ssl_lib import sizing
from ssl_lib.acceleration import keep_freed_memory
from ssl_lib.augment import nhwc_to_tensor, shift_flip, strong_augment
from ssl_lib.classifier import Classifier
from ssl_lib.device import select_device
from ssl_lib.errors import ConfigError, TrainingDiverged
from ssl_lib.optim import decay_groups, warmup_cosine_schedule
from ssl_lib.progress import progress_bar
from ssl_lib.timing import Laps

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams

log = logging.getLogger("ssl_lib.self_train")

METHODS = ("none", "label_propagation", "distill", "fixmatch")
# Where an epoch's time goes (ssl_lib.timing), history columns <phase>_seconds: the batches' gathering and
# augmentation; fixmatch's pseudo-labels (the EMA model on a weak view); the steps; the EMA update; the loss read back
# and the rest; the BatchNorm re-estimation after a method's last step; the val images.
PHASES = ("data", "teacher", "step", "ema", "other", "bn_recalibration", "eval")


# kw_only and no defaults where params.yaml has the value: the run's settings come from its params (from_params),
# and a caller that builds them by hand says every one. The default left is the recipe's, not a param.
@dataclass(frozen=True, kw_only=True)
class SelfTrainSettings:
    steps: tuple[str, ...]  # methods applied in order within each round, e.g. ("label_propagation", "fixmatch")
    rounds: int
    epochs: float  # passes over the pool per step
    batch_size: int  # pool images per step
    labeled_batch_size: int
    lr: float
    weight_decay: float
    unlabeled_weight: float
    ema_decay: float
    threshold: float  # fixmatch
    distribution_alignment: bool  # fixmatch
    temperature: float  # distill
    knn_k: int  # label_propagation
    alpha: float  # label_propagation: diffusion strength
    balance: bool  # label_propagation: rebalance propagated labels to the labeled set's class shares
    whiten: bool  # label_propagation: PCA-whiten the features before building the graph
    bn_recalibration: int  # batches of clean pool images that re-estimate BatchNorm statistics after a step
    max_shift_px: int  # the labeled (weak) view's shift; ssl_lib.sizing.shift_px sizes it to the images
    selection_margin: float  # val accuracy an earlier candidate must lead by to replace a later one
    seed: int
    device: str
    warmup_fraction: float = 0.05

    @classmethod
    def from_params(cls, params: PipelineParams, pool_size: int, num_classes: int,
                    image_size: int) -> SelfTrainSettings:
        """Self-training's settings, sized to a pool of ``pool_size`` images of ``image_size`` (``ssl_lib.sizing``):
        the batch, the passes from the image budget unless ``self_train.epochs`` is set, the graph's k and the
        labeled view's shift."""
        s = params.self_train
        size = sizing.self_train_size(pool_size, s.batch_size, s.epochs, s.images_seen, s.max_epochs, s.rounds,
                                      len(s.steps))
        return cls(steps=s.steps, rounds=s.rounds, epochs=size.epochs, batch_size=size.batch_size,
                   labeled_batch_size=s.labeled_batch_size, lr=s.lr, weight_decay=s.weight_decay,
                   unlabeled_weight=s.unlabeled_weight, ema_decay=s.ema_decay, threshold=s.threshold,
                   distribution_alignment=s.distribution_alignment, temperature=s.temperature,
                   knn_k=sizing.knn_k(s.knn_k, pool_size, num_classes), alpha=s.alpha, balance=s.balance,
                   whiten=s.whiten, bn_recalibration=s.bn_recalibration, max_shift_px=sizing.shift_px(image_size),
                   selection_margin=s.selection_margin, seed=params.seed, device=s.device)


@dataclass
class PseudoLabels:
    """The teacher's labels for the pool: class, confidence and the weight each got in training."""

    label: np.ndarray  # (N,) int
    confidence: np.ndarray  # (N,) float, the target's top probability
    weight: np.ndarray  # (N,) float; 0 = not used


@dataclass
class Candidate:
    """A model the run could ship: the fine-tuned starting point or a round's result, with its val accuracy."""

    name: str  # "fine-tune", "round 1", ...
    val_accuracy: float
    state: dict[str, torch.Tensor]  # its weights, on the CPU
    # How far val_accuracy overstates the model because it was chosen on the same val images (the fine-tune's best
    # epoch); 0 for a round, whose weights are not chosen on val.
    val_optimism: float = 0.0

    @property
    def selection_score(self) -> float:
        """The val accuracy the rule compares: unchosen, as a round's is."""
        return self.val_accuracy - self.val_optimism


@dataclass
class SelfTrainResult:
    model: Classifier  # the chosen candidate's model
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch of every step
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per step: pseudo-label quality
    pseudo_labels: PseudoLabels | None = None  # of the last step's teacher
    candidates: list[Candidate] = field(default_factory=list)  # the fine-tuned model, then each round's
    chosen: int = 0  # index into candidates


SELECTION_RULE = ("the final model is the last self-training round unless an earlier candidate (the SSL fine-tune, "
                  "an earlier round) leads it in accuracy on the labeled val images, never test, by more than "
                  "self_train.selection_margin; the fine-tune's val accuracy counts less its optimism (the best of "
                  "its epochs on those images, less the mean of its last 20)")


def choose_final(val_accuracies: list[float], margin: float) -> int:
    """The index of the candidate to ship: the last, unless an earlier one leads the current choice on val by more
    than ``margin``. The later candidates learned from more of the data, and val is small and noisy, so an earlier
    one must win clearly. Callers pass the fine-tune's val accuracy less its optimism (``Candidate.selection_score``).
    NaN (no val images) never wins."""
    best = len(val_accuracies) - 1
    for index in range(len(val_accuracies) - 2, -1, -1):
        if val_accuracies[index] > val_accuracies[best] + margin + 1e-9:  # 1e-9: 0.74 vs 0.71 + 0.03 in floats
            best = index
    return best


def candidate_scores(candidates: list[Candidate]) -> str:
    """``fine-tune 0.4500 (0.3838 counted, optimism 0.0662), round 1 0.4125, round 2 0.3875``"""
    return ", ".join(f"{c.name} {c.val_accuracy:.4f}"
                     + (f" ({c.selection_score:.4f} counted, optimism {c.val_optimism:.4f})" if c.val_optimism else "")
                     for c in candidates)


def validate_settings(settings: SelfTrainSettings, pool_size: int) -> None:
    """Raise ConfigError naming the setting for anything that cannot run.

    params.yaml's validation catches most of these first; knn_k against the pool size can only be checked
    once the prepared data are known.
    """
    unknown = [m for m in settings.steps if m not in METHODS or m == "none"]
    if unknown:
        raise ConfigError(f"unknown self_train method {unknown}; use {', '.join(METHODS)}")
    if settings.rounds < 0:
        raise ConfigError(f"self_train.rounds must be >= 0, got {settings.rounds}")
    if not 0.0 < settings.threshold <= 1.0:
        raise ConfigError(f"self_train.threshold must be in (0, 1], got {settings.threshold}")
    if "label_propagation" in settings.steps and not 1 <= settings.knn_k < pool_size:
        raise ConfigError(f"self_train.knn_k must be in [1, pool size - 1] = [1, {pool_size - 1}], "
                          f"got {settings.knn_k}: lower self_train.knn_k")


# ---------------------------------------------------------------------------------------------- targets

def propagate_labels(features: torch.Tensor, labeled_rows: np.ndarray, labels: np.ndarray, num_classes: int,
                     *, k: int, alpha: float, gamma: float = 3.0, iterations: int = 20
                     ) -> torch.Tensor:
    """Label propagation over a kNN graph (Zhou et al., 2004; Iscen et al., 2019). Returns (N, C) class scores.

    W_ij = max(0, cos(f_i, f_j))^gamma for j among i's k nearest neighbours, symmetrised; S = D^-1/2 W D^-1/2;
    Z solves (I - alpha S) Z = Y by conjugate gradient, with Y_ic = 1/|L_c| for labeled row i of class c.
    """
    import scipy.sparse
    import scipy.sparse.linalg

    feats = F.normalize(features.float(), dim=1)
    n = len(feats)
    k = min(k, n - 1)
    rows, cols, vals = [], [], []
    for start in range(0, n, 1024):  # chunks keep the similarity block small
        sims, idx = (feats[start:start + 1024] @ feats.t()).topk(k + 1, dim=1)
        rows.append(np.repeat(np.arange(start, start + len(sims)), k))
        # Drop each row's best match, itself (a duplicate image may come first: same result).
        cols.append(idx[:, 1:].reshape(-1).numpy())
        vals.append(sims[:, 1:].clamp_min(0).pow(gamma).reshape(-1).numpy())
    w = scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    w = w + w.T
    degree = np.asarray(w.sum(axis=1)).ravel()
    d = scipy.sparse.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    system = scipy.sparse.eye(n) - alpha * (d @ w @ d)
    z = np.zeros((n, num_classes))
    labels = np.asarray(labels)
    for c in range(num_classes):
        members = np.asarray(labeled_rows)[labels == c]
        y = np.zeros(n)
        if len(members):
            y[members] = 1.0 / len(members)
        z[:, c], _ = scipy.sparse.linalg.cg(system, y, rtol=1e-6, maxiter=iterations)
    return torch.from_numpy(z).float()


def whitening(features: torch.Tensor, floor: float = 1e-3) -> Callable[[torch.Tensor], torch.Tensor]:
    """PCA whitening fitted on ``features``: the map that centres features, rotates them onto the principal axes
    and gives each axis unit variance (eigenvalues floored at ``floor`` x the largest, so that near-empty
    directions are not blown up into noise).

    A few directions dominate a trained encoder's features, and cosine similarity ranks neighbours by those alone;
    whitened, every direction counts, and the kNN graph links more images of the same class (docs/tuning.md ablation).
    """
    data = features.double()
    mean = data.mean(0)
    centred = data - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))
    projection = eigenvectors * eigenvalues.clamp_min(floor * float(eigenvalues.max())).rsqrt()
    return lambda f: ((f.double() - mean) @ projection).to(f.dtype)


def balance_to_prior(probs: torch.Tensor, prior: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp: rescale the classes' columns so that the pool's total mass per class follows ``prior``,
    each row staying a distribution. Diffusion favours classes whose seeds sit in dense regions of the graph;
    this undoes it (the labeled set's class shares estimate the pool's)."""
    probs = probs.clamp_min(1e-12)
    target = prior.to(probs) * len(probs)
    for _ in range(iterations):
        probs = probs * (target / probs.sum(0))
        probs = probs / probs.sum(1, keepdim=True)
    return probs


def class_prior(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """The class shares of the labeled images."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return torch.from_numpy(counts / counts.sum()).float()


def propagated_probabilities(scores: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Propagated scores as per-image class distributions, rebalanced to ``prior`` when given."""
    probs = scores.clamp_min(0)
    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
    return probs if prior is None else balance_to_prior(probs, prior)


def propagation_targets(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard targets and weights from propagated class distributions: certainty x inverse class frequency
    (Iscen et al.)."""
    num_classes = probs.shape[1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    certainty = 1.0 - entropy / math.log(num_classes)
    label = probs.argmax(1)
    counts = torch.bincount(label, minlength=num_classes).float().clamp_min(1)
    balance = (len(label) / num_classes) / counts[label]
    return F.one_hot(label, num_classes).float(), certainty * balance


# ---------------------------------------------------------------------------------------------- training

def _features_and_probs(model: Classifier, images: torch.Tensor, temperature: float = 1.0,
                        batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    feats, probs = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f = model.features(images[i:i + batch_size].float().div_(255.0))
            feats.append(f.cpu())
            probs.append(torch.softmax(model.head(f) / temperature, dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    _, probs = _features_and_probs(model, images)
    return float((probs.argmax(1) == labels.cpu()).float().mean())


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(1)


class _Alignment:
    """ReMixMatch distribution alignment: scale pseudo-label probabilities by prior / running mean prediction."""

    def __init__(self, num_classes: int, device: torch.device, momentum: float = 0.999) -> None:
        self.prior = torch.full((num_classes,), 1.0 / num_classes, device=device)
        self.running = self.prior.clone()
        self.momentum = momentum

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        self.running.mul_(self.momentum).add_(probs.mean(0), alpha=1 - self.momentum)
        aligned = probs * (self.prior / self.running.clamp_min(1e-6))
        return aligned / aligned.sum(1, keepdim=True)


def _train_step_method(method: str, model: Classifier, pool: torch.Tensor, labeled_x: torch.Tensor,
                       labeled_y: torch.Tensor, static: tuple[torch.Tensor, torch.Tensor] | None,
                       settings: SelfTrainSettings, generator: torch.Generator, tag: dict[str, Any],
                       val: tuple[torch.Tensor, torch.Tensor], on_epoch: Callable[[dict[str, Any]], None] | None,
                       progress: bool) -> Classifier:
    """Train ``model`` (in place) for ``settings.epochs`` passes over the pool; return its EMA copy."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    device = pool.device
    n = len(pool)
    batch = min(settings.batch_size, n)
    steps_per_epoch = sizing.steps_per_pass(n, batch)
    total = sizing.self_train_steps(settings.epochs, n, batch)
    optimizer = torch.optim.AdamW(decay_groups(model.parameters(), settings.lr, settings.weight_decay))
    scheduler = warmup_cosine_schedule(optimizer, total, settings.warmup_fraction)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
    averaged = ema.module  # the EMA copy of ``model``, updated in place
    assert isinstance(averaged, Classifier)  # always true (a deep copy); narrows AveragedModel's Module for mypy
    align = _Alignment(model.num_classes, device) if settings.distribution_alignment else None
    targets, weights = (t.to(device) for t in static) if static is not None else (None, None)

    step, epoch = 0, 0
    bar = progress_bar(total=total, enabled=progress, desc=f"self_train {method} r{tag['round']}", unit="step")
    laps = Laps(device, PHASES)
    try:
        while step < total:
            start = time.perf_counter()
            laps.start()
            order = torch.randperm(n, generator=generator).to(device)
            sums = {"loss": 0.0, "mask": 0.0}
            done = 0
            for s in range(min(steps_per_epoch, total - step)):
                u_idx = order[s * batch:(s + 1) * batch]
                l_idx = torch.randint(len(labeled_x), (settings.labeled_batch_size,), generator=generator).to(device)
                x_l = shift_flip(labeled_x[l_idx], generator, settings.max_shift_px)
                u_raw = pool[u_idx]
                x_s = strong_augment(u_raw, generator)
                laps.lap("data")
                if method == "fixmatch":
                    with torch.no_grad():
                        ema.eval()
                        probs = torch.softmax(ema(shift_flip(u_raw, generator, settings.max_shift_px)), dim=1)
                        if align is not None:
                            probs = align(probs)
                        confidence, label = probs.max(1)
                        target = F.one_hot(label, model.num_classes).float()
                        weight = (confidence >= settings.threshold).float()
                else:
                    assert targets is not None and weights is not None  # every method but fixmatch has static targets
                    target, weight = targets[u_idx], weights[u_idx]
                laps.lap("teacher")
                model.train()
                logits = model(torch.cat([x_l, x_s]))
                loss_l = F.cross_entropy(logits[:len(x_l)], labeled_y[l_idx])
                loss_u = (weight * _soft_cross_entropy(logits[len(x_l):], target)).mean()
                loss = loss_l + settings.unlabeled_weight * loss_u
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                laps.lap("step")
                ema.update_parameters(model)
                laps.lap("ema")
                value = float(loss.detach())  # read every step already (the epoch's mean loss): checking it is free
                if not math.isfinite(value):
                    raise TrainingDiverged.at(f"self-training ({method}, round {tag['round']})", step + 1, total,
                                              value, settings.lr, "self_train.lr")
                sums["loss"] += value
                sums["mask"] += float((weight > 0).float().mean())
                done += 1
                step += 1
                bar.update(1)
                laps.lap("other")
            epoch += 1
            if step >= total:  # the kept model is measured (and used) with statistics of clean images
                recalibrate_batchnorm(averaged, pool, settings.bn_recalibration, batch, generator)
            laps.lap("bn_recalibration")
            loss_mean, mask_rate = sums["loss"] / done, sums["mask"] / done
            val_acc = accuracy(averaged, *val)
            laps.lap("eval")
            record = {**tag, "epoch": epoch, "loss": loss_mean, "mask_rate": mask_rate, "val_acc": val_acc,
                      "seconds": time.perf_counter() - start, **laps.columns()}
            if on_epoch is not None:
                on_epoch(record)
    finally:
        bar.close()
    return averaged


def recalibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor, batches: int, batch_size: int,
                          generator: torch.Generator) -> None:
    """Re-estimate ``model``'s BatchNorm running statistics on ``batches`` batches of clean uint8 ``images``.

    The student trains on strongly augmented views, so the statistics it keeps (and their EMA) describe those, not
    the clean images it is evaluated and used on; ``torch.optim.swa_utils.update_bn`` recomputes them as an
    exact average over the given batches. A model without BatchNorm is left as it is.
    """
    from torch.optim.swa_utils import update_bn

    if batches <= 0:
        return
    rows = (torch.randint(len(images), (batch_size,), generator=generator).to(images.device) for _ in range(batches))
    with torch.no_grad():  # update_bn runs plain forwards: no graph to build
        update_bn((images[r].float().div_(255.0) for r in rows), model)


def self_train(model: Classifier, pool_images: np.ndarray, labeled_rows: np.ndarray, labeled_labels: np.ndarray,
               val_images: np.ndarray, val_labels: np.ndarray, settings: SelfTrainSettings,
               on_epoch: Callable[[dict[str, Any]], None] | None = None,
               on_round: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
               teacher_val_optimism: float = 0.0) -> SelfTrainResult:
    """Improve a fine-tuned ``model`` with the unlabeled pool; return the final EMA model.

    ``pool_images`` (uint8 NHWC) are every image the model may train on: unlabeled and labeled, never val
    or test. ``labeled_rows`` are the positions of the labeled images within the pool and ``labeled_labels``
    their classes. ``val_images``/``val_labels`` only measure: the pseudo-labels' accuracy, each epoch's
    model and the candidates, never trained on. ``teacher_val_optimism`` is how far ``model``'s val accuracy
    overstates it (``ssl_lib.classifier.val_optimism`` of its fine-tuning history); the rule discounts it.
    """
    validate_settings(settings, len(pool_images))
    device = select_device(settings.device)
    if device.type == "cpu":  # as the pretraining engine does: no fresh pages for every step's large tensors
        keep_freed_memory()
    model = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)
    pool = nhwc_to_tensor(np.asarray(pool_images), device)
    labeled_rows = np.asarray(labeled_rows, dtype=np.int64)
    labeled_y = torch.as_tensor(np.asarray(labeled_labels), dtype=torch.long, device=device)
    labeled_x = pool[torch.as_tensor(labeled_rows, device=device)]
    val = (nhwc_to_tensor(np.asarray(val_images), device),
           torch.as_tensor(np.asarray(val_labels), dtype=torch.long, device=device))
    generator = torch.Generator().manual_seed(settings.seed)
    result = SelfTrainResult(model=model)

    def record_epoch(record: dict[str, Any]) -> None:
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)

    def candidate(name: str, val_optimism: float = 0.0) -> Candidate:
        weights = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        return Candidate(name, accuracy(model, *val), weights, val_optimism)

    result.candidates.append(candidate("fine-tune", teacher_val_optimism))
    for round_index in range(settings.rounds):
        for method in settings.steps:
            tag = {"round": round_index + 1, "method": method}
            start = time.perf_counter()
            feats, probs = _features_and_probs(model, pool, settings.temperature if method == "distill" else 1.0)
            features_end = time.perf_counter()  # the teacher's features and predictions over the pool (on the host)
            graph_seconds = 0.0
            static = None
            if method == "label_propagation":
                transform = whitening(feats) if settings.whiten else _identity
                graph_feats = transform(feats)
                scores = propagate_labels(graph_feats, labeled_rows, labeled_y.cpu().numpy(), model.num_classes,
                                          k=settings.knn_k, alpha=settings.alpha)
                prior = class_prior(labeled_y.cpu().numpy(), model.num_classes) if settings.balance else None
                propagated = propagated_probabilities(scores, prior)
                static = propagation_targets(propagated)
                pseudo = _pseudo_labels(propagated, static[1])
                graph_seconds = time.perf_counter() - features_end  # whitening, the kNN graph, the diffusion
                val_acc = _propagated_val_accuracy(model, graph_feats, propagated, val, settings.knn_k, transform)
            else:
                if method == "distill":
                    static = (probs, torch.ones(len(probs)))
                weight = static[1] if static is not None else (probs.max(1).values >= settings.threshold).float()
                pseudo = _pseudo_labels(probs, weight)
                val_acc = accuracy(model, *val)
            summary: dict[str, Any] = {**tag, "pseudo_label_val_accuracy": val_acc,
                                       "pseudo_label_used_fraction": float((pseudo.weight > 0).mean()),
                                       "targets_seconds": time.perf_counter() - start,
                                       "features_seconds": features_end - start, "graph_seconds": graph_seconds}
            log.info("round %d %s: pseudo-labels %.4f on val, %.1f%% of the pool used", tag["round"], method,
                     val_acc, 100 * summary["pseudo_label_used_fraction"])
            result.rounds.append(summary)
            result.pseudo_labels = pseudo
            if on_round is not None:
                on_round(summary)
            model = _train_step_method(method, model, pool, labeled_x, labeled_y, static, settings, generator, tag,
                                       val, record_epoch, progress)
        if settings.steps:
            result.candidates.append(candidate(f"round {round_index + 1}"))
    result.chosen = choose_final([c.selection_score for c in result.candidates], settings.selection_margin)
    chosen = result.candidates[result.chosen]
    log.info("final model: %s (val accuracy %s)", chosen.name, candidate_scores(result.candidates))
    if result.chosen != len(result.candidates) - 1:
        model.load_state_dict(chosen.state)
    model.eval()
    result.model = model
    return result


def _pseudo_labels(probs: torch.Tensor, weight: torch.Tensor) -> PseudoLabels:
    confidence, label = probs.max(1)
    return PseudoLabels(label=label.numpy().astype(np.int64), confidence=confidence.numpy().astype(np.float32),
                        weight=weight.cpu().numpy().astype(np.float32))


def _identity(features: torch.Tensor) -> torch.Tensor:
    return features


def _propagated_val_accuracy(model: Classifier, pool_feats: torch.Tensor, probs: torch.Tensor,
                             val: tuple[torch.Tensor, torch.Tensor], k: int,
                             transform: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Accuracy of propagated labels carried to val images by their k nearest pool neighbours (in the graph's
    feature space: ``pool_feats`` are the graph's, ``transform`` maps the model's features there).

    Val images stay out of the graph: each one takes the similarity-weighted mean of its neighbours' propagated
    class probabilities.
    """
    if len(val[1]) == 0:
        return float("nan")
    val_feats = transform(_features_and_probs(model, val[0])[0])
    sims, idx = (F.normalize(val_feats, dim=1) @ F.normalize(pool_feats, dim=1).t()).topk(k, dim=1)
    votes = (sims.clamp_min(0).unsqueeze(2) * probs[idx]).sum(1)
    return float((votes.argmax(1) == val[1].cpu()).float().mean())
