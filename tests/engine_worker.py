"""A pretraining run in a process of its own, for the engine tests (kill-and-resume, torchrun/DDP).

    python -m tests.engine_worker OUT.json --methods simclr,moco [--checkpoint PATH --every 3 --kill-at 7]
        [--fixed-views]

Runs each method on 384 digits for one or two epochs and writes {method: step_losses} (rank 0 only)
and the encoder weights to OUT.json / OUT.<method>.pt. Under torchrun it joins the gloo process group.
``--fixed-views`` replaces the random two-view augmentation by the identity, so that a data-parallel run,
whose ranks draw their own augmentations, must reproduce the single-process losses exactly.
``--kill-at N`` sends SIGKILL to this process right after optimizer step N.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import torch

VIT = {"mae", "autoregressive"}


def digits_uint8() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images / 16 * 255).round().astype(np.uint8)[..., None]


def settings_for(method: str, epochs: int, every: int):
    from tests.helpers import digits_settings

    options = {"augment": False} if method == "rotation" else {}
    return digits_settings(method, epochs, backbone="vit_tiny" if method in VIT else "convnet_small", batch_size=64,
                           lr=1e-3, max_images=384, device="auto", options=options, checkpoint_every=every)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--methods", default="simclr")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--every", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--fixed-views", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from ssl_lib.distributed import init_from_env, launched_by_torchrun, rank_info, shutdown
    from ssl_lib.pretrain import pretrain
    from ssl_lib.pretrain_plan import make_pseudo_labels

    if args.fixed_views:
        import ssl_lib.methods.views as views_module  # every two-view method, SimCLR too, draws its views there

        def identity(images, generator, settings):
            return images.clone()

        views_module.augment_views = identity
    if launched_by_torchrun():
        init_from_env("cpu")

    def on_step(done: int) -> None:
        if done == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    images = digits_uint8()
    losses = {}
    for method in args.methods.split(","):
        settings = settings_for(method, args.epochs, args.every)
        result = pretrain(images, [0.3], [0.35], make_pseudo_labels(settings, len(images)), settings,
                          progress=False, checkpoint_path=args.checkpoint, on_step=on_step)
        losses[method] = result.step_losses
        if rank_info().is_main:
            torch.save(result.encoder_state, f"{args.out}.{method}.pt")
    if rank_info().is_main:
        Path(args.out).write_text(json.dumps(losses))
    shutdown()


if __name__ == "__main__":
    main()
