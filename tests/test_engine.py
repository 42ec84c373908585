"""The pretraining engine: kill-and-resume equivalence, 2-process DDP (gloo) equivalence, streaming, precision."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import make_project, run_cmd, use_project

REPO = Path(__file__).resolve().parents[1]


def _worker(out: Path, *args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
                    "--module"]
    else:
        launcher = [sys.executable, "-m"]
    # Run as a module from the repository root, so that the worker imports this checkout's packages.
    return subprocess.run([*launcher, "tests.engine_worker", str(out), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a), torch.load(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", ["simclr", "moco", "mae"])
def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, method):
    # simclr: the augmentation generator mid-epoch; moco: queue and momentum encoder; mae: ViT + masking.
    common = ["--methods", method, "--epochs", "2", "--every", "4"]
    plain = _worker(tmp_path / "plain.json", *common)
    assert plain.returncode == 0, plain.stderr
    checkpoint = tmp_path / "ckpt.pt"
    killed = _worker(tmp_path / "killed.json", *common, "--checkpoint", str(checkpoint), "--kill-at", "10")
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.is_file() and not (tmp_path / "killed.json").exists()
    resumed = _worker(tmp_path / "resumed.json", *common, "--checkpoint", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 8" in resumed.stderr
    assert json.loads((tmp_path / "resumed.json").read_text()) == json.loads((tmp_path / "plain.json").read_text())
    assert _same_weights(tmp_path / f"resumed.json.{method}.pt", tmp_path / f"plain.json.{method}.pt")


def _digits():
    from tests.engine_worker import digits_uint8

    return digits_uint8()


def _run(settings, images=None, checkpoint=None):
    from ssl_lib.pretrain import pretrain
    from ssl_lib.pretrain_plan import make_pseudo_labels

    images = _digits() if images is None else images
    return pretrain(images, [0.3], [0.35], make_pseudo_labels(settings, len(images)), settings, progress=False,
                    checkpoint_path=checkpoint)


@pytest.mark.parametrize("method", ["simclr", "byol", "rotation"])
def test_the_engine_step_is_what_pretrain_runs(method):
    """Two steps through ssl_lib.engine's public functions reproduce a two-step ``pretrain``: what the
    throughput benchmark times is the pipeline's step. (byol: ``after_step``; rotation: per-sample targets.)"""
    from dataclasses import replace

    from ssl_lib.acceleration import resolve_acceleration
    from ssl_lib.augment import nhwc_to_tensor
    from ssl_lib.engine import build_model, make_engine, train_step
    from ssl_lib.pretrain_plan import make_pseudo_labels, subset_indices
    from tests.engine_worker import settings_for

    images = _digits()
    settings = replace(settings_for(method, 1, every=0), max_images=128)  # batch 64: two steps
    expected = _run(settings, images)
    assert len(expected.step_losses) == 2

    cpu = torch.device("cpu")
    accel = resolve_acceleration(cpu, settings.precision, settings.channels_last, settings.compile)
    model, encoder, _ = build_model(method, settings.backbone, settings.options, [0.3], [0.35], 1, 8, settings.seed,
                                    cpu, accel)
    engine = make_engine(model, accel, cpu, 2, settings.optimizer, settings.lr, settings.weight_decay,
                         settings.warmup_fraction)
    pseudo = make_pseudo_labels(settings, len(images))
    data = nhwc_to_tensor(images[subset_indices(len(images), settings)])
    generator = torch.Generator().manual_seed(int(pseudo["epoch_seed"][0]))
    order = torch.randperm(len(data), generator=generator)
    model.train()
    losses = []
    for step in range(2):
        idx = order[step * 64:(step + 1) * 64]
        targets = {k: torch.as_tensor(v)[0, idx] for k, v in pseudo.items() if k != "epoch_seed"}
        losses.append(float(train_step(engine, data[idx].float().div_(255.0), targets, generator, step).detach()))
    assert losses == expected.step_losses
    state = encoder.state_dict()
    assert state.keys() == expected.encoder_state.keys()
    assert all(torch.equal(state[k], expected.encoder_state[k]) for k in state)


def test_checkpoint_of_another_run_or_a_torn_file_is_ignored(tmp_path, caplog):
    from dataclasses import replace

    from tests.engine_worker import settings_for

    settings = replace(settings_for("rotation", 1, every=2), max_images=256)
    checkpoint = tmp_path / "ckpt.pt"
    _run(settings, checkpoint=checkpoint)
    assert checkpoint.is_file()  # the last checkpoint before the end stays until the caller removes it
    other = replace(settings, lr=2e-3)
    with caplog.at_level("INFO", logger="ssl_lib.pretrain"):
        resumed = _run(other, checkpoint=checkpoint)
    assert "different run" in caplog.text
    assert resumed.step_losses == _run(replace(other, checkpoint_every=0)).step_losses
    checkpoint.write_bytes(b"not a checkpoint")
    caplog.clear()
    with caplog.at_level("INFO", logger="ssl_lib.pretrain"):
        again = _run(settings, checkpoint=checkpoint)
    assert "unreadable checkpoint" in caplog.text
    assert again.step_losses == _run(replace(settings, checkpoint_every=0)).step_losses


EXACT_UNDER_DDP = ["rotation", "simclr", "moco", "barlow_twins", "vicreg", "byol", "simsiam", "dino"]


def test_two_process_gloo_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """Same global batch of 64: 2 ranks x 32 with cross-rank BatchNorm, gathered losses and averaged gradients.

    Augmentations are fixed (identity views; rotation without jitter) because each rank draws its own.
    """
    methods = ",".join(EXACT_UNDER_DDP)
    single = _worker(tmp_path / "single.json", "--methods", methods, "--fixed-views")
    assert single.returncode == 0, single.stderr
    ddp = _worker(tmp_path / "ddp.json", "--methods", methods, "--fixed-views", torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = json.loads((tmp_path / "single.json").read_text()), json.loads((tmp_path / "ddp.json").read_text())
    for method in EXACT_UNDER_DDP:
        assert len(one[method]) == len(two[method]) == 6
        np.testing.assert_allclose(two[method], one[method], rtol=2e-3, err_msg=method)
        # Not trivially equal: the loss moves over the steps.
        assert max(one[method]) - min(one[method]) > 1e-3, method


@pytest.mark.slow
def test_every_method_trains_under_two_process_ddp(tmp_path):
    from ssl_lib.methods import METHODS

    methods = sorted(set(METHODS) - set(EXACT_UNDER_DDP) - {"colorization"})  # colorization needs RGB
    ddp = _worker(tmp_path / "ddp.json", "--methods", ",".join(methods), torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    losses = json.loads((tmp_path / "ddp.json").read_text())
    for method in methods:
        assert len(losses[method]) == 6 and all(math.isfinite(v) for v in losses[method]), method


def test_streaming_from_a_memory_map_gives_the_same_run_as_data_on_the_device(tmp_path):
    from dataclasses import replace

    from ssl_lib.batches import IndexedRows
    from tests.engine_worker import settings_for

    images = _digits()
    np.save(tmp_path / "images.npy", images)
    mapped = IndexedRows(np.load(tmp_path / "images.npy", mmap_mode="r"), np.arange(len(images))[::-1].copy())
    settings = settings_for("simclr", 1, every=0)
    on_device = _run(replace(settings, data_placement="device"), images=images[::-1].copy())
    streamed = _run(replace(settings, data_placement="stream"), images=mapped)
    assert streamed.step_losses == on_device.step_losses
    assert all(torch.equal(streamed.encoder_state[k], on_device.encoder_state[k]) for k in on_device.encoder_state)


def test_auto_placement_streams_what_does_not_fit(monkeypatch):
    from ssl_lib import batches

    images = np.zeros((1000, 28, 28, 1), dtype=np.uint8)
    monkeypatch.setattr(batches, "free_memory_bytes", lambda device: 10 * images.nbytes)
    assert batches.choose_placement(images, torch.device("cpu")) == "device"
    monkeypatch.setattr(batches, "free_memory_bytes", lambda device: 2 * images.nbytes)
    assert batches.choose_placement(images, torch.device("cpu")) == "stream"
    assert batches.choose_placement(images, torch.device("cpu"), "device") == "device"


def test_precision_layout_and_compile_are_decided_per_device():
    from ssl_lib.acceleration import resolve_acceleration

    cpu = resolve_acceleration(torch.device("cpu"))
    assert (cpu.dtype, cpu.channels_last, cpu.compile) == (torch.float32, True, False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_acceleration(torch.device("cpu"), "fp16")
    assert resolve_acceleration(torch.device("cpu"), "bf16", channels_last=False).dtype == torch.bfloat16


def test_bf16_autocast_run_learns_on_cpu():
    from dataclasses import replace

    from tests.engine_worker import settings_for

    result = _run(replace(settings_for("rotation", 2, every=0), precision="bf16", max_images=256))
    assert all(math.isfinite(v) for v in result.step_losses)
    assert np.mean(result.step_losses[-2:]) < np.mean(result.step_losses[:2])


@pytest.mark.slow
def test_pretrain_stage_killed_mid_run_resumes_on_the_next_repro(tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj", {
        "pretrain": {"method": "simclr", "epochs": 3, "batch_size": 32, "max_images": 512, "checkpoint_every": 5},
    })
    use_project(project, monkeypatch)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    run_cmd([sys.executable, "-m", "dvc", "repro", "pseudo_labels"], project)
    checkpoint = project / "artifacts/checkpoints/pretrain.pt"
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "pretrain"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_file(), "the stage finished (or failed) before its first checkpoint"
    assert not (project / "artifacts/pretrain/encoder.pt").exists()

    resumed = run_cmd([sys.executable, "-m", "dvc", "repro", "pretrain"], project)
    assert "resuming from step" in resumed.stdout + resumed.stderr
    assert not checkpoint.exists()  # removed once the outputs are written
    resumed_bytes = (project / "artifacts/pretrain/encoder.pt").read_bytes()
    run_cmd([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "pretrain"], project)
    assert (project / "artifacts/pretrain/encoder.pt").read_bytes() == resumed_bytes


@pytest.mark.slow
def test_pretrain_stage_with_two_devices_runs_under_torchrun(tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj", {"pretrain": {"method": "simclr", "devices": 2}})
    use_project(project, monkeypatch)
    out = run_cmd([sys.executable, "-m", "dvc", "repro", "pretrain"], project)
    assert "launching 2 processes" in out.stdout + out.stderr
    info = json.loads((project / "artifacts/pretrain/encoder.json").read_text())
    assert info["method"] == "simclr"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ssl-pipeline").experiment_id],
                              filter_string="tags.`sslpipe.stage` = 'pretrain'")
    assert len(runs) == 1  # rank 0 alone logs
    assert runs[0].data.tags["processes"] == "2"
    assert "pretrain_loss" in runs[0].data.metrics
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain.devices"] == 2


def test_convnet_pools_before_relu_with_the_same_values_and_gradients():
    """Max-pooling before the ReLU (the cheaper order) computes exactly what ReLU-then-pool does."""
    from torch import nn

    from ssl_lib.models.backbones import ConvNet

    torch.manual_seed(0)
    net = ConvNet(1, 28)
    # The same modules, with every MaxPool2d-then-ReLU pair swapped back to ReLU-then-MaxPool2d.
    layers = list(net.layers)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    reference = nn.Sequential(*layers)
    x = torch.randn(16, 1, 28, 28)
    outputs, grads = [], []
    for model in (net.layers, reference):
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        outputs.append(y)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert any(isinstance(m, nn.MaxPool2d) for m in net.layers)
    assert [type(m) for m in reference] != [type(m) for m in net.layers]
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_engine_keeps_freed_memory_for_the_next_step():
    """After make_engine on a CPU, a large freed tensor's memory stays in the process (glibc would unmap it)."""
    code = """
import sys, torch
from ssl_lib.acceleration import keep_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(50_000_000)  # 200 MB
before = rss()
del x
print(before - rss())
"""
    freed = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        freed[mode] = int(done.stdout.strip())
    assert freed["default"] > 150e6 and freed["keep"] < 50e6, freed
