"""Fast tests of the joint-embedding methods: MoCo, BYOL, SimSiam, Barlow Twins, VICReg, DINO.

Same data as tests/test_learning.py (sklearn digits upsampled to 16x16, convnet_small), one CPU
thread. Each method pretrains once per module (lazily, on first use); the loss, kNN and collapse
tests read that run.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssl_lib.methods.barlow_twins as barlow_twins
import ssl_lib.methods.byol as byol
import ssl_lib.methods.dino as dino
import ssl_lib.methods.moco as moco
import ssl_lib.methods.simsiam as simsiam
import ssl_lib.methods.vicreg as vicreg
from ssl_lib.augment import AugmentSettings, augment_views, nhwc_to_tensor, tensor_to_nhwc_uint8
from ssl_lib.classifier import build_classifier
from ssl_lib.evaluation import extract_features, knn_accuracy
from ssl_lib.methods import get_method
from ssl_lib.methods.momentum import cosine_momentum, ema_update, make_target
from ssl_lib.methods.views import ViewOptions, normalized_embedding_std
from ssl_lib.models.backbones import build_backbone
from ssl_lib.pretrain import pretrain
from ssl_lib.pretrain_plan import make_pseudo_labels
from tests.helpers import BACKBONE, digits_settings

FAMILIES = {"moco": "contrastive", "byol": "non-contrastive", "simsiam": "non-contrastive",
            "barlow_twins": "non-contrastive", "vicreg": "non-contrastive", "dino": "non-contrastive"}
NAMES = sorted(FAMILIES)

# Small heads keep the single-threaded runs short; MoCo's queue must stay well below 1797 images.
# BYOL's target momentum of 0.9 lets its EMA target move within these short runs; DINO keeps its default
# 0.99, as with 0.9 its teacher collapses to a near-uniform output after ~30 steps and the loss climbs.
OPTIONS: dict[str, dict[str, Any]] = {
    "moco": {"proj_hidden": 128, "proj_dim": 64, "queue_size": 512},
    "byol": {"proj_hidden": 128, "proj_dim": 64, "pred_hidden": 128, "momentum": 0.9},
    "simsiam": {"proj_hidden": 128, "proj_dim": 128, "pred_hidden": 32},
    "barlow_twins": {"proj_hidden": 128, "proj_dim": 128, "lambd": 0.01},
    "vicreg": {"proj_hidden": 128, "proj_dim": 128},
    "dino": {"head_hidden": 128, "bottleneck_dim": 64, "out_dim": 256},
}
# BYOL and DINO learn from a moving target, which takes more steps to pull away from random init.
EPOCHS = {name: 8 if name in ("byol", "dino") else 4 for name in NAMES}
LR = {"moco": 3e-3, "byol": 1e-3, "simsiam": 1e-3, "barlow_twins": 3e-3, "vicreg": 3e-3, "dino": 3e-3}
EMBED_DIM = {"moco": 64, "byol": 64, "simsiam": 128, "barlow_twins": 128, "vicreg": 128, "dino": 64}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


_RUNS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def pretrained(digits):
    """``pretrained(name)`` -> PretrainResult of the method's short run, computed once per module."""
    images, _, mean, std = digits

    def run(name: str):
        if name not in _RUNS:
            settings = digits_settings(name, EPOCHS[name], lr=LR[name], options=OPTIONS[name])
            _RUNS[name] = pretrain(images, mean, std, make_pseudo_labels(settings, len(images)), settings,
                                   progress=False)
        return _RUNS[name]

    yield run
    _RUNS.clear()


def _knn_clean_and_augmented(encoder_state, digits) -> tuple[float, float]:
    """kNN accuracy (as tests/test_learning.py's ``_knn``) of clean test images, and of augmented ones
    (fixed random resized crops of 0.5-1 of the area, flips) against the same clean bank."""
    images, labels, mean, std = digits
    bank = np.concatenate([np.flatnonzero(labels == c)[:80] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(images)), bank)
    views = augment_views(nhwc_to_tensor(images[rest]), torch.Generator().manual_seed(123),
                          AugmentSettings(crop_scale=(0.5, 1.0), jitter_p=0.0))
    model = build_classifier(BACKBONE, 1, 16, 10, mean, std, encoder_state, seed=0)
    feats, feats_aug = extract_features(model, images), extract_features(model, tensor_to_nhwc_uint8(views))
    return (knn_accuracy(feats[bank], labels[bank], feats[rest], labels[rest], k=20),
            knn_accuracy(feats[bank], labels[bank], feats_aug, labels[rest], k=20))


@pytest.fixture(scope="module")
def random_knn(digits) -> tuple[float, float]:
    return _knn_clean_and_augmented(None, digits)


@pytest.fixture(scope="module")
def random_feature_std(digits) -> float:
    images, _, mean, std = digits
    model = build_classifier(BACKBONE, 1, 16, 10, mean, std, None, seed=0)
    return float(normalized_embedding_std(torch.as_tensor(extract_features(model, images))))


# --- registry, options, previews ----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_registered_with_family_and_view_options(name):
    cls = get_method(name)
    assert cls.family == FAMILIES[name]
    assert issubclass(cls.Options, ViewOptions)  # SimCLR's view options and defaults, reused
    assert ViewOptions().model_dump().items() <= cls.Options().model_dump().items()
    with pytest.raises(ValueError, match="bogus"):
        cls.resolve_options({"bogus": 1})
    pseudo = cls.make_pseudo_labels(10, 2, seed=0)
    assert set(pseudo) == {"epoch_seed"} and pseudo["epoch_seed"].shape == (2,)


@pytest.mark.parametrize("name", NAMES)
def test_preview_shows_two_views(digits, name):
    images = digits[0][:8]
    pairs = get_method(name).preview_pairs(images, {"epoch_seed": np.array([7])}, 8)
    assert len(pairs) == 8 and pairs[0][1] == "#0 view 1" and pairs[1][1] == "#0 view 2"
    assert pairs[0][0].shape == (16, 16, 1) and pairs[0][0].dtype == np.uint8


# --- loss functions against loop references -----------------------------------------------------

def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_info_nce_matches_loop():
    q, k, queue = _randn(5, 3, seed=1), _randn(5, 3, seed=2), _randn(7, 3, seed=3)
    t = 0.3
    expected = []
    for i in range(5):
        u = q[i] / q[i].norm()
        pos = torch.dot(u, k[i] / k[i].norm()) / t
        negs = [torch.dot(u, n / n.norm()) / t for n in queue]
        expected.append(-(pos - torch.logsumexp(torch.stack([pos, *negs]), dim=0)))
    assert torch.allclose(moco.info_nce_loss(q, k, queue, t), torch.stack(expected).mean(), atol=1e-5)
    # The positive being the query itself beats an unrelated key.
    assert moco.info_nce_loss(q, q.clone(), queue, 0.1) < moco.info_nce_loss(q, k, queue, 0.1)


def test_moco_queue_wraps_around():
    encoder, dim = build_backbone(BACKBONE, 1, 16)
    method = moco.MoCo(encoder, dim, 1, 16, queue_size=5, proj_dim=3, proj_hidden=8)
    keys = _randn(3, 3)
    method._enqueue(keys)
    method._enqueue(2 * keys)
    unit = F.normalize(keys, dim=1)
    assert int(method.queue_ptr) == 1
    assert torch.allclose(method.queue[[3, 4, 0]], unit) and torch.allclose(method.queue[[1, 2]], unit[1:])


def test_byol_loss_is_two_minus_two_cosine():
    p, z = _randn(4, 6, seed=1), _randn(4, 6, seed=2)
    expected = torch.stack([2 - 2 * torch.dot(p[i], z[i]) / (p[i].norm() * z[i].norm()) for i in range(4)]).mean()
    assert torch.allclose(byol.byol_loss(p, z), expected, atol=1e-6)
    assert torch.allclose(byol.byol_loss(p, 3 * p), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(byol.byol_loss(p, -p), torch.tensor(4.0), atol=1e-6)


def test_simsiam_loss_is_negative_cosine_with_stop_gradient():
    p = _randn(4, 6, seed=1).requires_grad_()
    z = _randn(4, 6, seed=2).requires_grad_()
    loss = simsiam.simsiam_loss(p, z)
    expected = -torch.stack([torch.dot(p[i], z[i]) / (p[i].norm() * z[i].norm()) for i in range(4)]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None


def test_barlow_twins_matches_loop():
    z1, z2 = _randn(6, 3, seed=1), _randn(6, 3, seed=2)
    lambd, b, d = 0.3, 6, 3

    def standardized(z):
        mean = [sum(float(z[n, i]) for n in range(b)) / b for i in range(d)]
        var = [sum((float(z[n, i]) - mean[i]) ** 2 for n in range(b)) / b for i in range(d)]
        return [[(float(z[n, i]) - mean[i]) / math.sqrt(var[i] + 1e-5) for i in range(d)] for n in range(b)]

    a1, a2 = standardized(z1), standardized(z2)
    expected = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a1[n][i] * a2[n][j] for n in range(b)) / b
            expected += (1 - c) ** 2 if i == j else lambd * c ** 2
    assert barlow_twins.barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(expected, rel=1e-5)
    # Identical, decorrelated views are the optimum: loss ~ lambd * (sample correlations) only.
    assert barlow_twins.barlow_twins_loss(z1, z1, lambd) < barlow_twins.barlow_twins_loss(z1, z2, lambd)


def test_vicreg_matches_loop():
    z1, z2 = _randn(5, 3, seed=1), 0.2 * _randn(5, 3, seed=2)
    sim_w, var_w, cov_w, b, d = 2.0, 3.0, 0.5, 5, 3
    invariance = sum(float(z1[n, i] - z2[n, i]) ** 2 for n in range(b) for i in range(d)) / (b * d)
    variance = covariance = 0.0
    for z in (z1, z2):
        mean = [sum(float(z[n, i]) for n in range(b)) / b for i in range(d)]
        cov = [[sum((float(z[n, i]) - mean[i]) * (float(z[n, j]) - mean[j]) for n in range(b)) / (b - 1)
                for j in range(d)] for i in range(d)]
        variance += sum(max(0.0, 1 - math.sqrt(cov[i][i] + 1e-4)) for i in range(d)) / d / 2
        covariance += sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    expected = sim_w * invariance + var_w * variance + cov_w * covariance
    assert variance > 0  # z2's small spread is penalized
    assert vicreg.vicreg_loss(z1, z2, sim_w, var_w, cov_w).item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_matches_loop():
    s = [_randn(4, 5, seed=1), _randn(4, 5, seed=2)]
    t = [_randn(4, 5, seed=3), _randn(4, 5, seed=4)]
    center, ts, tt = 0.1 * _randn(5, seed=5), 0.5, 0.2
    terms = []
    for v, w in ((0, 1), (1, 0)):
        for b in range(4):
            target = torch.softmax((t[v][b] - center) / tt, dim=0)
            log_p = torch.log_softmax(s[w][b] / ts, dim=0)
            terms.append(-(target * log_p).sum())
    expected = torch.stack(terms).mean()
    assert torch.allclose(dino.dino_loss(s, t, center, ts, tt), expected, atol=1e-6)


def test_ema_update_and_cosine_momentum():
    online = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(5.0)
    ema_update(target, online, 0.75)
    for b, t, o in zip(before, target.parameters(), online.parameters(), strict=True):
        assert torch.allclose(t, 0.75 * b + 0.25 * o)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_pretrain_calls_after_step_once_per_step(digits, monkeypatch):
    images, _, mean, std = digits
    calls: list[tuple[int, int]] = []
    original = byol.BYOL.after_step

    def spy(self, step, total_steps):
        calls.append((step, total_steps))
        original(self, step, total_steps)

    monkeypatch.setattr(byol.BYOL, "after_step", spy)
    settings = digits_settings("byol", 2, max_images=128, batch_size=64, options=OPTIONS["byol"])
    pretrain(images, mean, std, make_pseudo_labels(settings, len(images)), settings, progress=False)
    assert calls == [(i, 4) for i in range(4)]


# --- pretraining on digits ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_loss_falls(pretrained, name):
    history = pretrained(name).history
    losses = [h["loss"] for h in history]
    assert len(history) == EPOCHS[name] and all(np.isfinite(losses))
    # Against the first epoch's mean; for a moving target (BYOL, DINO) too, on these short runs.
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses


@pytest.mark.parametrize("name", NAMES)
def test_features_beat_random_init_on_knn_of_augmented_images(pretrained, digits, random_knn, name):
    # Random conv features are strong on clean digits (kNN ~0.91) and these short runs do not
    # beat them there yet (that takes far more steps than a unit test can afford on one thread).
    # What a few steps do teach is invariance to the views: kNN of augmented queries (random ~0.44).
    clean, augmented = _knn_clean_and_augmented(pretrained(name).encoder_state, digits)
    assert augmented > random_knn[1], (clean, augmented, random_knn)
    assert clean > 0.7, (clean, augmented, random_knn)  # and the features still separate the digits


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_do_not_collapse(pretrained, digits, random_feature_std, name):
    result = pretrained(name)
    # The head's embeddings (recorded during training): about 1/sqrt(D) when spread over the
    # sphere, near 0 when collapsed.
    assert result.history[-1]["embedding_std"] > 0.3 / np.sqrt(EMBED_DIM[name])
    # The backbone's features are post-ReLU (all positive), so their normalized std is small even
    # at random init (~0.011 for D=128); training must not shrink it below that.
    images, _, mean, std = digits
    model = build_classifier(BACKBONE, 1, 16, 10, mean, std, result.encoder_state)
    feats = torch.as_tensor(extract_features(model, images))
    assert float(normalized_embedding_std(feats)) > random_feature_std


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_losses(digits, name):
    images, _, mean, std = digits
    settings = digits_settings(name, 2, max_images=256, batch_size=64, options=OPTIONS[name])
    runs = [pretrain(images, mean, std, make_pseudo_labels(settings, len(images)), settings, progress=False)
            for _ in range(2)]
    assert len(runs[0].step_losses) == 2 * (256 // 64)
    assert runs[0].step_losses == runs[1].step_losses
    for key, value in runs[0].encoder_state.items():
        assert torch.equal(value, runs[1].encoder_state[key]), key
