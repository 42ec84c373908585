"""Stage 1, ingest: turn the configured source into the canonical, versioned dataset in data/prepared."""
from __future__ import annotations

import logging

from ssl_lib.config import PipelineParams
from tasks import paths
from tasks.common import run_stage_cli

log = logging.getLogger("sslpipe.ingest")


def run(params: PipelineParams) -> dict:
    import mlflow

    from ssl_lib.data import ingest
    from tasks.tracking import stage_run

    data = params.data
    with stage_run("ingest", params, section={"seed": params.seed, "data": data.model_dump()}):
        meta = ingest(source=data.source, path=data.path, seed=params.seed,
                      labels_per_class=data.labels_per_class, label_fraction=data.label_fraction,
                      val_per_class=data.val_per_class, test_fraction=data.test_fraction,
                      out_dir=paths.PREPARED)
        skipped = meta.get("skipped", [])
        if skipped:
            shown = "\n  ".join(f"{item[0]}: {item[1]}" for item in skipped[:20])
            log.warning("skipped %d unreadable image(s) (full list in %s):\n  %s", len(skipped),
                        paths.PREPARED / "report.json", shown)
        counts = meta["split_counts"]
        mlflow.log_metrics({"num_images": meta["num_images"], "num_skipped": len(skipped),
                            **{f"split_{name}": n for name, n in counts.items()}})
        mlflow.log_artifact(str(paths.PREPARED / "meta.json"))
        mlflow.log_artifact(str(paths.PREPARED / "report.json"))
        log.info("ingested %d images from %s: %s", meta["num_images"], data.source, counts)
    return meta


def check_label_budget(params: PipelineParams) -> None:
    """Fail before any compute when the data cannot serve the params, with a UserError naming the fix.

    A label budget the classes cannot meet raises LabelBudgetError (from assign_splits), a knn_k above the
    self-training pool ConfigError, a method that cannot use these images MethodRequirementError. It reads
    the source once without writing anything, so a bad budget leaves no partial outputs.
    """
    from ssl_lib.data import assign_splits, load_source

    data = params.data
    raw = load_source(data.source, data.path)
    splits = assign_splits(raw.labels, raw.predefined_test, params.seed, data.labels_per_class,
                           data.label_fraction, data.val_per_class, data.test_fraction, class_names=raw.class_names)
    from ssl_lib.errors import ConfigError, MethodRequirementError

    pool_size = int(((splits == "unlabeled") | (splits == "labeled")).sum())
    if "label_propagation" in params.self_train.steps and params.self_train.knn_k >= pool_size:
        raise ConfigError(f"self_train.knn_k {params.self_train.knn_k} must be below the self-training pool size "
                          f"({pool_size} unlabeled + labeled images): lower self_train.knn_k")
    from ssl_lib.methods import get_method

    needed = get_method(params.pretrain.method).required_channels
    if needed and raw.images.shape[-1] != needed:
        raise MethodRequirementError(
            f"pretrain.method {params.pretrain.method!r} needs {needed}-channel images, but data.source "
            f"{data.source!r} has {raw.images.shape[-1]}: use a colour dataset (e.g. data.source=folder with "
            "RGB images) or another method")



if __name__ == "__main__":
    run_stage_cli("ingest", run)
