"""Stage 2, pseudo_labels: the pretext targets (or view seeds) for the chosen method, plus a preview grid."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks import paths
from tasks.common import run_stage_cli

if TYPE_CHECKING:
    import numpy as np

    from ssl_lib.config import PipelineParams

log = logging.getLogger("sslpipe.pseudo_labels")


def run(params: PipelineParams) -> dict[str, np.ndarray]:
    import mlflow
    import numpy as np

    from ssl_lib.data.prepared import load_pool
    from ssl_lib.io import atomic_path
    from ssl_lib.methods import get_method
    from ssl_lib.pretrain_plan import PretrainSettings, make_pseudo_labels, subset_indices
    from ssl_lib.previews import save_preview
    from tasks.tracking import stage_run

    pool, _ = load_pool(paths.PREPARED)
    settings = PretrainSettings.from_params(params, len(pool))
    section = {"seed": params.seed, "pseudo_labels": params.pseudo_labels.model_dump(),
               "pretrain.method": settings.method, "pretrain.epochs": settings.epochs,
               "pretrain.max_images": settings.max_images}
    with stage_run("pseudo_labels", params, section=section):
        # A method that cannot use these images (colorization on grayscale) stops here, before any work.
        get_method(settings.method).check_data(int(pool.shape[3]), int(pool.shape[1]))
        pseudo = make_pseudo_labels(settings, len(pool))
        with atomic_path(paths.PSEUDO_TARGETS) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **pseudo)
        # The preview's images must line up with the targets: the pretraining subset, in order.
        subset = pool[subset_indices(len(pool), settings)]
        save_preview(settings.method, subset, pseudo, paths.PSEUDO_PREVIEW, count=params.pseudo_labels.preview_count,
                     options=settings.options)
        mlflow.log_artifact(str(paths.PSEUDO_PREVIEW))
        mlflow.log_metrics({"pool_size": len(pool), "targets_bytes": paths.PSEUDO_TARGETS.stat().st_size})
        log.info("pseudo-labels for %s: %s", settings.method,
                 {k: (v.shape, str(v.dtype)) for k, v in pseudo.items()})
    return pseudo


if __name__ == "__main__":
    run_stage_cli("pseudo_labels", run)
