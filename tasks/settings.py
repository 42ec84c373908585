"""Map validated params onto pretraining's plain settings object: shared by the pseudo_labels and pretrain stages.

Each other stage maps its own section in its own module, so that editing one stage's mapping reruns that stage
only (this file is a code dep of the stages that import it)."""
from __future__ import annotations

from ssl_lib.config import PipelineParams
from ssl_lib.pretrain_plan import PretrainSettings, pretraining_pool_size
from ssl_lib.sizing import pretrain_size


def pretrain_settings(params: PipelineParams, num_images: int) -> PretrainSettings:
    """Pretraining's settings for ``num_images`` prepared pool images: the batch and the passes sized to the
    pool (``ssl_lib.sizing``) from the image budget, unless ``pretrain.epochs`` is set."""
    p = params.pretrain
    size = pretrain_size(pretraining_pool_size(num_images, p.max_images), p.batch_size, p.epochs, p.images_seen,
                         p.max_epochs, p.world_size)
    return PretrainSettings(method=p.method, backbone=p.backbone, epochs=int(size.epochs),
                            batch_size=size.batch_size, lr=p.lr, weight_decay=p.weight_decay, seed=params.seed,
                            max_images=p.max_images, device=p.device, options=p.method_options(),
                            precision=p.precision, channels_last=None if p.channels_last == "auto" else p.channels_last,
                            compile=None if p.compile == "auto" else p.compile,
                            data_placement=p.data_placement, checkpoint_every=p.checkpoint_every)
