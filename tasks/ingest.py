"""Stage 1, ingest: turn the configured source into the canonical, versioned dataset in data/prepared.

It builds on the prepared dataset already there (an output DVC keeps in place: ``persist``): only new or changed
files are decoded, and images keep their splits (``ssl_lib.data.ingest``).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks import paths
from tasks.common import run_stage_cli

if TYPE_CHECKING:
    from ssl_lib.config import PipelineParams

log = logging.getLogger("sslpipe.ingest")
_SHOWN = 20  # files listed in the log; the full lists are in report.json and lineage.json


def _listed(items: list[str]) -> str:
    more = f"\n  ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "\n  ".join(items[:_SHOWN]) + more


def run(params: PipelineParams) -> dict:
    import mlflow

    from ssl_lib.data.ingest import ingest
    from tasks.tracking import stage_run

    data = params.data
    with stage_run("ingest", params, section={"seed": params.seed, "data": data.model_dump()}):
        meta = ingest(source=data.source, path=data.path, seed=params.seed,
                      labels_per_class=data.labels_per_class, label_fraction=data.label_fraction,
                      val_per_class=data.val_per_class, test_fraction=data.test_fraction,
                      out_dir=paths.PREPARED, image_size=data.image_size, workers=data.workers,
                      cache_file=paths.SOURCE_HASH_CACHE)
        skipped = meta.get("skipped", [])
        if skipped:
            log.warning("skipped %d unreadable image(s) (full list in %s):\n  %s", len(skipped),
                        paths.PREPARED / "report.json", _listed([f"{item[0]}: {item[1]}" for item in skipped]))
        for what in ("removed", "changed"):
            if meta[what]:
                log.warning("%d file(s) %s since the previous data version (full list in %s):\n  %s",
                            len(meta[what]), what, paths.PREPARED / "lineage.json", _listed(meta[what]))
        if meta["left_test"] or meta["entered_test"]:
            log.warning("%d former test image(s) are now training images and %d training image(s) are now test "
                        "images (seed, test_fraction or the test/ folder changed): models trained before are "
                        "not comparable with new ones on this test split", meta["left_test"], meta["entered_test"])
        counts = meta["split_counts"]
        mlflow.log_metrics({"num_images": meta["num_images"], "num_skipped": len(skipped),
                            "data_version": meta["data_version"], "num_added": meta["added"],
                            "num_removed": len(meta["removed"]), "num_changed": len(meta["changed"]),
                            "num_decoded": meta["decoded"], "num_reused": meta["reused"],
                            **{f"split_{name}": n for name, n in counts.items()}})
        for name in ("meta.json", "report.json", "lineage.json"):
            mlflow.log_artifact(str(paths.PREPARED / name))
        log.info("ingested %d images from %s (data version %d; %d decoded, %d reused): %s", meta["num_images"],
                 data.source, meta["data_version"], meta["decoded"], meta["reused"], counts)
    return meta


if __name__ == "__main__":
    run_stage_cli("ingest", run)
