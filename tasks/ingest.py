"""Stage 1, ingest: turn the configured source into the canonical, versioned dataset in data/prepared."""
from __future__ import annotations

import logging

from ssl_lib.config import PipelineParams
from tasks import paths
from tasks.common import run_stage_cli

log = logging.getLogger("sslpipe.ingest")


def run(params: PipelineParams) -> dict:
    import mlflow

    from ssl_lib.data.ingest import ingest
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


if __name__ == "__main__":
    run_stage_cli("ingest", run)
