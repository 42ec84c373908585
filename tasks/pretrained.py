"""The pretrain stage's encoder, read back: what finetune and evaluate load.

Apart from the stage modules, so that no stage imports another: each stage that reads the encoder lists this
reader as a code dep, and editing how finetune trains reruns finetune only.
"""
from __future__ import annotations

from tasks import paths


def load_encoder_info() -> tuple[dict, dict]:
    """The encoder's description (encoder.json: backbone, input shape, normalisation) and its state_dict."""
    import json

    import torch

    from ssl_lib.errors import DataError

    if not paths.ENCODER.is_file() or not paths.ENCODER_INFO.is_file():
        raise DataError(f"{paths.ENCODER} is missing; run the stage first: dvc repro pretrain")
    info = json.loads(paths.ENCODER_INFO.read_text())
    return info, torch.load(paths.ENCODER, weights_only=True, map_location="cpu")
