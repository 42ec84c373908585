"""Map validated params onto pretraining's plain settings object: shared by the pseudo_labels and pretrain stages.

Each other stage maps its own section in its own module, so that editing one stage's mapping reruns that stage
only (this file is a code dep of the stages that import it)."""
from __future__ import annotations

from ssl_lib.config import PipelineParams
from ssl_lib.pretrain_plan import PretrainSettings


def pretrain_settings(params: PipelineParams) -> PretrainSettings:
    p = params.pretrain
    return PretrainSettings(method=p.method, backbone=p.backbone, epochs=p.epochs, batch_size=p.batch_size,
                            lr=p.lr, weight_decay=p.weight_decay, seed=params.seed, max_images=p.max_images,
                            device=p.device, options=p.method_options(), precision=p.precision,
                            channels_last=None if p.channels_last == "auto" else p.channels_last,
                            compile=None if p.compile == "auto" else p.compile,
                            data_placement=p.data_placement, checkpoint_every=p.checkpoint_every)
