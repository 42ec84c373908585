"""The prepared dataset's layout: the canonical on-disk form that ingest writes and every later stage reads.

A directory with
  images.npy        uint8 (N, H, W, C), np.save format, memory-mappable
  pool_indices.npy  int64 indices of the non-test images: the self-supervised pretraining pool
  meta.json         class_names, shape, per-channel mean/std in [0, 1] over non-test images, source,
                    source_version, num_images, num_test, num_skipped, ...
  report.json       skipped: [{path, reason}], num_skipped
  manifest.csv      index, split, label, source_id, sha1 (sha1 of the image's raw bytes)
Written by ``ssl_lib.data.ingest``. The same inputs always give byte-identical files, so DVC sees no
change when nothing changed.
Only manifest.csv depends on the label budget: the other files are what pretraining reads, so a new
label budget leaves them byte-identical and DVC does not retrain the encoder.
"""
from __future__ import annotations

FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.csv"
META_FILE = "meta.json"
REPORT_FILE = "report.json"
POOL_FILE = "pool_indices.npy"
MANIFEST_COLUMNS = ["index", "split", "label", "source_id", "sha1"]
SPLITS: tuple[str, ...] = ("unlabeled", "labeled", "val", "test")
