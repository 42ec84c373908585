"""Stage 0, fingerprint: what identifies the source's data, written to data/source.json for ingest to depend on.

dvc.yaml runs it on every `dvc repro` (always_changed). It lists the source's files and hashes their contents,
decoding no image; hashes are cached by file metadata, so an unchanged folder costs a stat per file. When the
data are unchanged the file is byte-identical and DVC skips ingest; when files were added, changed or removed
it differs and DVC reruns ingest and everything the new data invalidates.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import paths
from tasks.common import run_stage_cli

if TYPE_CHECKING:
    from ssl_lib.config import DataParams

log = logging.getLogger("sslpipe.fingerprint")


def fingerprint(data: DataParams, root: Path = Path(".")) -> dict:
    """The source's fingerprint (``ssl_lib.data.sources.source_fingerprint``) with the hash cache of the project at
    ``root``: the one definition of "the source changed", for DVC (this stage) and the retrain flow alike."""
    from ssl_lib.data.sources import source_fingerprint

    return source_fingerprint(data.source, data.path, cache_file=root / paths.SOURCE_HASH_CACHE)


def run(data: DataParams) -> dict:
    from ssl_lib.io import write_text

    found = fingerprint(data)
    write_text(paths.SOURCE_FINGERPRINT, json.dumps(found, indent=2, sort_keys=True) + "\n")
    log.info("source %s: %s (%d files)", found["source"], found["source_version"], found["num_files"])
    return found


def load_data_section(path: str) -> DataParams:
    """Only the data section of params.yaml: validating all params would import the method registry (torch),
    seconds on every `dvc repro` for nothing."""
    from ssl_lib.config import load_data_params

    return load_data_params(path)


if __name__ == "__main__":
    run_stage_cli("fingerprint", run, load=load_data_section)
