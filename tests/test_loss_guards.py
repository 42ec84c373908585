"""A NaN or infinite loss stops every training stage with one line naming the phase and the step (issue #28):
nothing after it trains, is chosen or registered. Tiny random images, in process."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_lib.errors import TrainingDiverged, UserError


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 48, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, size, size, 1), dtype=np.uint8), np.arange(n) % 4


def _nan_from_call(real, bad_call: int):
    """``real`` whose result is NaN from its ``bad_call``-th call (1-based) on: a loss that went bad mid-run."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        return result * math.nan if calls["n"] >= bad_call else result

    return wrapped


def test_pretraining_stops_at_the_step_whose_loss_is_nan(monkeypatch):
    import ssl_lib.pretrain as pretrain_module
    from ssl_lib.pretrain_plan import make_pseudo_labels
    from tests.helpers import digits_settings

    images, _ = _images()
    settings = digits_settings("rotation", 3, batch_size=16, lr=1e-3, weight_decay=0.0)
    epochs: list[dict] = []
    # 3 steps an epoch: step 5 is the second epoch's second.
    monkeypatch.setattr(pretrain_module, "train_step", _nan_from_call(pretrain_module.train_step, 5))
    with pytest.raises(TrainingDiverged, match=r"the pretraining loss is nan at step 5 of 9: .*lower pretrain\.lr "
                                               r"\(now 0\.001\)"):
        pretrain_module.pretrain(images, [0.3], [0.35], make_pseudo_labels(settings, len(images)), settings,
                                 on_epoch=epochs.append, progress=False)
    assert [row["epoch"] for row in epochs] == [1]  # the diverged epoch is never recorded


@pytest.mark.parametrize("lp_epochs, phase, step", [(0, "fine-tuning", 8), (2, "linear-probe", 5)])
def test_fine_tuning_stops_at_the_step_whose_loss_is_nan(monkeypatch, lp_epochs: int, phase: str, step: int):
    import torch.nn.functional as F

    from ssl_lib.classifier import build_classifier, train_classifier
    from tests.helpers import finetune_settings

    images, labels = _images()
    model = build_classifier("convnet_small", 1, 8, 4, [0.3], [0.35], seed=0)
    settings = finetune_settings(mode="full", epochs=3, batch_size=16, lr=1e-3, weight_decay=0.0, seed=0,
                                 head_init="random", lp_epochs=lp_epochs)
    monkeypatch.setattr(F, "cross_entropy", _nan_from_call(F.cross_entropy, step))  # 3 steps an epoch
    with pytest.raises(TrainingDiverged, match=rf"the {phase} loss is nan at step {step} of "):
        train_classifier(model, images, labels, None, None, settings, progress=False)


def test_a_real_overflow_in_fine_tuning_is_caught():
    """No injection: inputs scaled past float32's range make the loss NaN on the first step."""
    from ssl_lib.classifier import build_classifier, train_classifier
    from tests.helpers import finetune_settings

    images, labels = _images()
    model = build_classifier("convnet_small", 1, 8, 4, [0.3], [1e-40], seed=0)  # a denormal std: x / std overflows
    with pytest.raises(TrainingDiverged, match="the fine-tuning loss is nan at step 1 of 9"):
        train_classifier(model, images, labels, None, None,
                         finetune_settings(mode="full", epochs=3, batch_size=16, lr=1e-3, weight_decay=0.0, seed=0,
                                           head_init="random", lp_epochs=0),
                         progress=False)


def test_self_training_stops_at_the_step_whose_loss_is_nan(monkeypatch):
    import ssl_lib.self_train as self_train_module
    from ssl_lib.classifier import build_classifier
    from tests.helpers import self_train_settings

    images, labels = _images(64)
    model = build_classifier("convnet_small", 1, 8, 4, [0.3], [0.35], seed=0)
    settings = self_train_settings(steps=("fixmatch",), rounds=1, epochs=2, batch_size=16,
                                   labeled_batch_size=8, bn_recalibration=1, device="cpu")
    epochs: list[dict] = []
    monkeypatch.setattr(self_train_module, "_soft_cross_entropy",
                        _nan_from_call(self_train_module._soft_cross_entropy, 3))
    with pytest.raises(TrainingDiverged, match=r"the self-training \(fixmatch, round 1\) loss is nan at step 3 of "
                                               r"\d+: .*lower self_train\.lr"):
        self_train_module.self_train(model, images[:48], np.arange(8), labels[:8], images[48:], labels[48:],
                                     settings, on_epoch=epochs.append, progress=False)
    assert epochs == []  # 3 steps an epoch: the first epoch never ends, and no model of it is a candidate


def test_the_stage_cli_prints_a_divergence_as_one_line_with_exit_2(tmp_path: Path, monkeypatch, capsys):
    from tasks.common import STAGE_REPORT_ENV, USER_ERROR_EXIT, run_stage_cli

    assert issubclass(TrainingDiverged, UserError)  # not retried by the flow, and no traceback
    report = tmp_path / "report.json"
    monkeypatch.setenv(STAGE_REPORT_ENV, str(report))

    def body(params):
        raise TrainingDiverged.at("self-training (fixmatch, round 1)", 3, 40, math.inf, 4e-3, "self_train.lr")

    with pytest.raises(SystemExit) as info:
        run_stage_cli("self_train", body, load=lambda path: None)
    assert info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sslpipe self_train: error: the self-training (fixmatch, round 1) loss is inf at step 3 of 40: "
                   "training diverged; lower self_train.lr (now 0.004), or check the data for broken images"]
    assert '"kind": "TrainingDiverged"' in report.read_text()


def test_a_diverged_pair_names_the_model(monkeypatch):
    """ssl_lib.finetune.finetune_pair says which of the two diverged; the finetune stage adds its params."""
    from ssl_lib import finetune

    def train(model, *args, **kwargs):
        raise TrainingDiverged.at("fine-tuning", 2, 8, math.nan, 1e-3, None)

    monkeypatch.setattr(finetune, "train_classifier", train)
    spec = dict(backbone="convnet_small", in_channels=1, image_size=16, num_classes=2, mean=[0.5], std=[0.5])
    with pytest.raises(finetune.ClassifierDiverged, match=r"^ssl classifier: the fine-tuning loss is nan") as info:
        finetune.finetune_pair(spec, None, None, None, None, None, dict.fromkeys(finetune.KINDS), seed=0)
    assert info.value.kind == "ssl" and isinstance(info.value, TrainingDiverged)
