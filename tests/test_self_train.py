"""The semi-supervised stage's learning code: students beat teachers, the pool never holds val or test images,
label propagation spreads labels, runs are deterministic, and bad settings fail before any compute."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_lib.augment import nhwc_to_tensor, strong_augment
from ssl_lib.classifier import build_classifier, train_classifier
from ssl_lib.config import ConfigError, parse_params
from ssl_lib.self_train import (
    SelfTrainSettings,
    accuracy,
    balance_to_prior,
    class_prior,
    propagate_labels,
    propagated_probabilities,
    propagation_targets,
    recalibrate_batchnorm,
    self_train,
    validate_settings,
    whitening,
)
from ssl_lib.self_train_pool import pool_rows
from tests.helpers import finetune_settings, self_train_settings


@pytest.fixture(scope="module")
def digits_teacher():
    """Digits with 3 labels per class: a weak fine-tuned teacher, its pool (unlabeled + labeled), val and test."""
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)  # the same numbers on any core count
    digits = load_digits()
    images = (digits.images / 16 * 255).round().astype(np.uint8)[..., None]
    labels = digits.target
    order = np.random.default_rng(0).permutation(len(labels))
    test, rest = order[:400], order[400:]
    labeled = np.concatenate([rest[labels[rest] == c][:3] for c in range(10)])
    val = np.concatenate([rest[labels[rest] == c][3:8] for c in range(10)])
    pool = np.setdiff1d(rest, val)
    model = build_classifier("convnet_small", 1, 8, 10, [0.3], [0.4], seed=0)
    model, _ = train_classifier(model, images[labeled], labels[labeled], images[val], labels[val],
                                finetune_settings(mode="full", epochs=30, batch_size=32, lr=2e-3, weight_decay=5e-4,
                                                  seed=0, head_init="random", lp_epochs=0), progress=False)
    return {"model": model, "images": images, "labels": labels, "pool": pool, "labeled": labeled, "val": val,
            "test": test}


def _run(setup, steps, **overrides):
    settings = self_train_settings(**{"steps": steps, "rounds": 1, "epochs": 10, "batch_size": 64,
                                      "labeled_batch_size": 30, "threshold": 0.8, **overrides})
    images, labels, pool = setup["images"], setup["labels"], setup["pool"]
    labeled_rows = np.searchsorted(pool, setup["labeled"])
    return self_train(setup["model"], images[pool], labeled_rows, labels[setup["labeled"]], images[setup["val"]],
                      labels[setup["val"]], settings, progress=False)


def _test_accuracy(setup, model) -> float:
    test = setup["test"]
    return accuracy(model, nhwc_to_tensor(setup["images"][test]), torch.as_tensor(setup["labels"][test]))


@pytest.mark.parametrize("steps, rounds", [(("label_propagation",), 2), (("fixmatch",), 1), (("distill",), 1),
                                           (("label_propagation", "fixmatch"), 1)])
def test_student_beats_its_teacher_on_digits(digits_teacher, steps, rounds):
    teacher = _test_accuracy(digits_teacher, digits_teacher["model"])
    result = _run(digits_teacher, steps, rounds=rounds, epochs=10 / rounds)
    student = _test_accuracy(digits_teacher, result.model)
    # Measured: teacher 0.41; fixmatch 0.68, distill 0.67, label_propagation + fixmatch 0.77 (1 thread).
    assert student > teacher + 0.1, (teacher, student)
    assert [r["method"] for r in result.rounds] == list(steps) * rounds
    assert result.history and all(0.0 <= r["val_acc"] <= 1.0 for r in result.history)


def test_self_training_is_deterministic(digits_teacher):
    first = _run(digits_teacher, ("fixmatch",), epochs=1)
    second = _run(digits_teacher, ("fixmatch",), epochs=1)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pseudo_labels_cover_the_pool_only(digits_teacher):
    result = _run(digits_teacher, ("distill",), epochs=1)
    pseudo = result.pseudo_labels
    assert len(pseudo.label) == len(pseudo.confidence) == len(digits_teacher["pool"])
    assert np.all((pseudo.confidence > 0) & (pseudo.confidence <= 1))


def test_the_pool_never_holds_val_or_test_images():
    splits = np.array(["unlabeled", "labeled", "val", "test", "unlabeled", "test", "val", "labeled"])
    rows = pool_rows(splits)
    assert rows.tolist() == [0, 1, 4, 7]
    assert not set(rows) & set(np.flatnonzero(np.isin(splits, ["val", "test"])))


def test_label_propagation_spreads_one_label_per_cluster():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5
    feats = np.concatenate([c + rng.normal(size=(100, 16)) for c in centers]).astype(np.float32)
    truth = np.repeat(np.arange(3), 100)
    labeled = np.array([0, 100, 200])
    scores = propagate_labels(torch.from_numpy(feats), labeled, truth[labeled], 3, k=10, alpha=0.99)
    assert (scores.argmax(1).numpy() == truth).mean() > 0.98
    targets, weights = propagation_targets(propagated_probabilities(scores))
    assert targets.shape == (300, 3) and torch.all(weights >= 0)


def test_balancing_restores_the_labeled_class_shares():
    """Diffusion that floods a dense class (here 2/3 of the mass to class 0) is pulled back to the labeled
    set's shares, each image keeping a distribution, and images whose class is clear keep it."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 100)
    probs = torch.from_numpy(np.eye(3)[truth] * 0.4 + rng.uniform(size=(300, 3)) * 0.2).float()
    probs[:, 0] += 0.4  # a bias toward class 0: about half of classes 1 and 2 now argmax to 0
    probs = probs / probs.sum(1, keepdim=True)
    assert (probs.argmax(1).numpy() == truth).mean() < 0.8
    prior = class_prior(np.array([0, 1, 2, 0, 1, 2]), 3)
    balanced = balance_to_prior(probs, prior)
    assert torch.allclose(balanced.sum(1), torch.ones(300), atol=1e-5)
    assert torch.allclose(balanced.sum(0) / 300, prior, atol=0.02)
    assert (balanced.argmax(1).numpy() == truth).mean() > 0.95


def test_whitening_lets_the_graph_see_a_weak_class_direction():
    """Two classes that differ along a direction of small variance, under a large class-independent one: cosine
    neighbours of the raw features are a coin toss, of the whitened ones mostly the right class."""
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 300)
    nuisance = rng.normal(size=(600, 2)) * 10  # dominates every angle
    signal = (truth[:, None] * 2 - 1) * 1.0 + rng.normal(size=(600, 1)) * 0.3
    feats = torch.from_numpy(np.hstack([nuisance, signal, rng.normal(size=(600, 5)) * 0.3])).float()
    labeled = np.array([0, 1, 300, 301])

    def propagated_accuracy(f: torch.Tensor) -> float:
        scores = propagate_labels(f, labeled, truth[labeled], 2, k=10, alpha=0.99)
        return float((scores.argmax(1).numpy() == truth).mean())

    unfloored = whitening(feats, floor=0.0)(feats)
    assert torch.allclose(torch.cov(unfloored.T.double(), correction=0), torch.eye(8, dtype=torch.double), atol=1e-3)
    transform = whitening(feats)  # the default floor: directions under 1e-3 of the largest variance stay small
    white = transform(feats)
    assert torch.equal(transform(feats[:5]), white[:5])  # one map, for the pool and for any other images
    assert propagated_accuracy(feats) < 0.6 < 0.95 < propagated_accuracy(white)


def test_batchnorm_recalibration_describes_the_clean_images():
    """Statistics left by other data (here: what a strong view would leave) are replaced by the clean images'."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(1))
    model[0].running_mean.fill_(0.9)
    model[0].running_var.fill_(0.01)
    images = torch.randint(0, 128, (500, 1, 8, 8), dtype=torch.uint8)  # mean about 0.25 of full scale
    model.eval()
    recalibrate_batchnorm(model, images, batches=20, batch_size=100, generator=torch.Generator().manual_seed(0))
    clean = images.float() / 255
    assert not model.training  # left in the mode it was in
    assert abs(float(model[0].running_mean) - float(clean.mean())) < 0.01
    assert abs(float(model[0].running_var) - float(clean.var())) < 0.01


def test_strong_augmentation_keeps_shape_and_range():
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    out = strong_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x.float() / 255)


@pytest.mark.parametrize("override, key", [
    ({"threshold": 0.0}, "self_train.threshold"),
    ({"threshold": 1.5}, "self_train.threshold"),
    ({"rounds": -1}, "self_train.rounds"),
    ({"method": "mixmatch"}, "self_train.method"),
    ({"method": ["none", "fixmatch"]}, "self_train.method"),
    ({"ema_decay": 1.0}, "self_train.ema_decay"),
])
def test_bad_self_train_params_are_rejected_at_load(override, key):
    with pytest.raises(ConfigError) as err:
        parse_params({"self_train": override})
    assert key in str(err.value)


def test_knn_k_is_sized_to_the_pool_and_an_impossible_one_is_still_refused_by_the_library():
    from tasks.preflight import check_label_budget

    # digits: 1797 images, 20 % test, 10 val per class: the pool holds 1797 - 360 - 100 = 1337 images or so.
    params = parse_params({"data": {"source": "digits"}, "self_train": {"method": "label_propagation",
                                                                         "knn_k": 5000}})
    shape = check_label_budget(params)
    settings = SelfTrainSettings.from_params(params, shape.self_train_pool, shape.num_classes, shape.height)
    assert settings.knn_k == shape.self_train_pool // (2 * shape.num_classes)
    with pytest.raises(ValueError, match="knn_k"):
        validate_settings(self_train_settings(steps=("label_propagation",), epochs=1.0, knn_k=100), pool_size=100)


def test_method_none_has_no_steps():
    assert parse_params({"self_train": {"method": "none"}}).self_train.steps == ()
    assert parse_params({"self_train": {"method": ["label_propagation", "fixmatch"]}}).self_train.steps == (
        "label_propagation", "fixmatch")
