"""Data that grows (issue #14): splits stay put across data versions, ingest is incremental, parallel and flat in
memory, and a change in the source's files is what makes DVC rerun ingest (and nothing else does)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ssl_lib.data.ingest import ingest
from ssl_lib.data.layout import read_manifest
from ssl_lib.data.prepared import load_prepared
from tests.helpers import REPO, make_project, run_cmd, use_project

FILES = ("images.npy", "pool_indices.npy", "manifest.csv", "meta.json", "report.json", "lineage.json")
BUDGET = dict(seed=0, labels_per_class=4, label_fraction=None, val_per_class=3, test_fraction=0.25)


def _add_images(root: Path, counts: dict[str, int], tag: str, size: int = 12, seed: int = 0) -> list[str]:
    """Write counts[cls] random RGB PNGs into root/cls ("" = the root: unlabeled); return their relative paths."""
    rng = np.random.default_rng([seed, len(tag)])
    written = []
    for cls, n in counts.items():
        for i in range(n):
            rel = f"{cls}/{tag}{i:03d}.png" if cls else f"{tag}{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / rel)
            written.append(rel)
    return written


def _manifest(out: Path) -> pd.DataFrame:
    return load_prepared(out).manifest.set_index("source_id")


TRAINING = ("unlabeled", "labeled", "val")


def _assert_same_images(out: Path, fresh: Path) -> None:
    """The same images (pixels and key per file), pretraining pool and statistics as a fresh ingest, in any row
    order: an incremental ingest keeps the previous rows where they were and appends the new ones."""
    grown, scratch = load_prepared(out), load_prepared(fresh)
    a, b = grown.manifest.set_index("source_id"), scratch.manifest.set_index("source_id")
    assert sorted(a.index) == sorted(b.index)
    ids = b.index
    assert a.loc[ids, "key"].tolist() == b["key"].tolist() and a.loc[ids, "sha1"].tolist() == b["sha1"].tolist()
    np.testing.assert_array_equal(grown.images[a.loc[ids, "index"].to_numpy()], scratch.images)
    for root, prepared in ((out, grown), (fresh, scratch)):  # the pool is every non-test row
        np.testing.assert_array_equal(np.load(root / "pool_indices.npy"),
                                      np.flatnonzero(prepared.manifest["split"].to_numpy() != "test"))
    for name in ("meta.json", "report.json"):  # meta: its statistics were updated, not redone
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _add_images(root, {"cat": 40, "dog": 40, "eel": 40, "": 5}, "a")
    return root


def test_adding_images_keeps_every_split_and_fills_only_from_new_ones(folder: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    first = ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    before = _manifest(out)
    added = _add_images(folder, {"cat": 12, "dog": 3, "": 2}, "new")
    second = ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    after = _manifest(out)

    # Every old image keeps its split; test and training never swap across the two versions.
    assert after.loc[before.index, "split"].tolist() == before["split"].tolist()
    test_keys = set(before.loc[before.split == "test", "key"]) | set(after.loc[after.split == "test", "key"])
    seen_keys = set(before.loc[before.split != "test", "key"]) | set(after.loc[after.split != "test", "key"])
    assert not test_keys & seen_keys
    # The budget is still met per class (the fixed budget needs nothing from the new images) ...
    for cls in range(3):
        counts = after[after.label == cls].split.value_counts()
        assert counts["labeled"] == 4 and counts["val"] == 3
    assert set(after.loc[added, "split"]) <= {"test", "unlabeled"}
    # ... the versions say when each image entered, and only the new files were decoded.
    assert (after.loc[before.index, "version"] == 1).all() and (after.loc[added, "version"] == 2).all()
    assert (first["data_version"], second["data_version"]) == (1, 2)
    assert (second["reused"], second["decoded"], second["added"]) == (len(before), len(added), len(added))
    lineage = json.loads((out / "lineage.json").read_text())
    assert [v["added"] for v in lineage["versions"]] == [len(before), len(added)]

    # Ingesting the grown folder from scratch decodes the same pixels and draws the same test set: test
    # membership depends on each image alone, not on the history.
    fresh = tmp_path / "fresh"
    ingest("folder", folder, **BUDGET, out_dir=fresh, workers=1)
    _assert_same_images(out, fresh)
    assert (_manifest(fresh).split == "test").equals((after.split == "test").loc[_manifest(fresh).index])
    # The previous rows stayed where they were; the new images come after them.
    assert after["index"].loc[before.index].tolist() == before["index"].tolist()
    assert sorted(after["index"].loc[added]) == list(range(len(before), len(after)))


def test_a_growing_label_fraction_is_filled_by_the_new_images(folder: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    budget = {**BUDGET, "labels_per_class": None, "label_fraction": 0.2}
    ingest("folder", folder, **budget, out_dir=out, workers=1)
    before = _manifest(out)
    added = _add_images(folder, {"cat": 30}, "new")
    ingest("folder", folder, **budget, out_dir=out, workers=1)
    after = _manifest(out)
    assert after.loc[before.index, "split"].tolist() == before["split"].tolist()
    cat = after[after.label == 0]
    n = int((cat.split != "test").sum())
    assert (cat.split == "labeled").sum() == max(1, round(0.2 * (n - 3)))
    newly_labeled = cat[(cat.split == "labeled") & (cat.version == 2)]
    assert len(newly_labeled) == (cat.split == "labeled").sum() - (before[before.label == 0].split == "labeled").sum()
    assert len(newly_labeled) > 0 and set(newly_labeled.index) <= set(added)


def test_removing_images_keeps_the_other_splits(folder: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    before = _manifest(out)
    gone = [before[(before.label == -1)].index[0], *before[before.split == "test"].index[:2],
            before[(before.label == 0) & (before.split == "labeled")].index[0],
            before[(before.label == 1) & (before.split == "val")].index[0]]
    for rel in gone:
        (folder / rel).unlink()
    meta = ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    after = _manifest(out)
    assert meta["removed"] == sorted(gone) and meta["data_version"] == 2 and meta["decoded"] == 0
    assert json.loads((out / "lineage.json").read_text())["versions"][-1]["removed"] == sorted(gone)
    kept = before.drop(index=gone)
    moved = kept[after.loc[kept.index, "split"] != kept.split]
    # Only the removed labeled and val images are replaced, each by an unlabeled image of its class; no image
    # enters or leaves the test split.
    assert sorted(zip(moved.label, moved.split, after.loc[moved.index, "split"], strict=True)) == [
        (0, "unlabeled", "labeled"), (1, "unlabeled", "val")]
    for cls in range(3):
        counts = after[after.label == cls].split.value_counts()
        assert counts["labeled"] == 4 and counts["val"] == 3
    ingest("folder", folder, **BUDGET, out_dir=tmp_path / "fresh", workers=1)
    _assert_same_images(out, tmp_path / "fresh")  # the kept rows were copied into a new file, in their order
    assert after["index"].loc[kept.index].is_monotonic_increasing


def _state(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FILES}


def test_a_grown_folder_appends_to_the_previous_images_file(folder: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    before, inode = (out / "images.npy").read_bytes(), (out / "images.npy").stat().st_ino
    first_manifest = (out / "manifest.csv").read_bytes()
    header = len(before) - load_prepared(out).images.nbytes
    _add_images(folder, {"cat": 3, "": 2}, "new")
    good = (folder / "cat" / "a000.png").read_bytes()
    (folder / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])  # its header reads, its pixels do not
    meta = ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    # The same file, its rows untouched: only the header and the new rows after them were written.
    grown = (out / "images.npy").read_bytes()
    assert (out / "images.npy").stat().st_ino == inode and (out / "images.npy").stat().st_nlink == 1
    assert grown[header:len(before)] == before[header:]
    assert (meta["reused"], meta["decoded"]) == (125, 6) and meta["num_images"] == 130
    assert [p for p, _ in meta["skipped"]] == ["dog/truncated.png"]  # decoded, failed, its row dropped
    ingest("folder", folder, **BUDGET, out_dir=tmp_path / "fresh", workers=1)
    _assert_same_images(out, tmp_path / "fresh")
    # The manifest too was appended to (the previous rows' lines copied), and reads as a full write would be.
    manifest = (out / "manifest.csv").read_bytes()
    assert manifest.startswith(first_manifest) and len(manifest) > len(first_manifest)
    assert manifest == read_manifest(out / "manifest.csv").to_csv(index=False, lineterminator="\n").encode()
    before_state = _state(out)
    # Nothing changed: every file byte-identical (the truncated file is tried again, and fails again).
    assert ingest("folder", folder, **BUDGET, out_dir=out, workers=1)["decoded"] == 1
    assert _state(out) == before_state


def test_copies_of_one_file_keep_a_row_each_across_versions(folder: Path, tmp_path: Path):
    """Files with the same content share a key: each copy still keeps its own row, the n-th copy the n-th row."""
    original = (folder / "cat" / "a000.png").read_bytes()
    (folder / "cat" / "copy1.png").write_bytes(original)
    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    rows_before = _manifest(out)["index"]
    (folder / "dog" / "copy2.png").write_bytes(original)  # a third copy, elsewhere
    _add_images(folder, {"eel": 2}, "new")
    meta = ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    # Every previous row kept in place; the third copy copies a row of the same content instead of decoding.
    assert (meta["reused"], meta["decoded"]) == (len(rows_before) + 1, 2)
    after = _manifest(out)["index"]
    assert after[rows_before.index].tolist() == rows_before.tolist()
    ingest("folder", folder, **BUDGET, out_dir=tmp_path / "fresh", workers=1)
    _assert_same_images(out, tmp_path / "fresh")


def test_a_linked_images_file_is_copied_not_changed(folder: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    cached = tmp_path / "dvc-cache-copy"
    os.link(out / "images.npy", cached)  # as DVC's hardlink cache type leaves it
    before = cached.read_bytes()
    _add_images(folder, {"cat": 3}, "new")
    assert ingest("folder", folder, **BUDGET, out_dir=out, workers=1)["decoded"] == 3
    assert cached.read_bytes() == before and (out / "images.npy").stat().st_ino != cached.stat().st_ino
    ingest("folder", folder, **BUDGET, out_dir=tmp_path / "fresh", workers=1)
    _assert_same_images(out, tmp_path / "fresh")


@pytest.mark.parametrize("where", ["writing rows", "committing"])
def test_a_failed_ingest_leaves_the_previous_version_as_it_was(folder: Path, tmp_path: Path, monkeypatch,
                                                               where: str):
    from ssl_lib.data import image_file
    from ssl_lib.data import ingest as module

    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    before = _state(out)
    _add_images(folder, {"cat": 3}, "new")
    owner, name = (image_file, "compact_rows") if where == "writing rows" else (module, "_commit")
    real = getattr(owner, name)

    def then_fail(*args, **kwargs):
        real(*args, **kwargs)  # the new rows are in the previous file (and, committing, its header counts them)
        raise OSError("disk full")

    monkeypatch.setattr(owner, name, then_fail)
    with pytest.raises(OSError, match="disk full"):
        ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    assert _state(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["images", "prepared"]
    load_prepared(out)


_KILLED = textwrap.dedent("""
    import os, signal, sys
    from ssl_lib.data import image_file
    from ssl_lib.data import ingest as module

    if __name__ == "__main__":
        owner, name = (image_file, "compact_rows") if sys.argv[3] == "writing rows" else (module, "_commit")
        real = getattr(owner, name)

        def then_killed(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(owner, name, then_killed)
        module.ingest("folder", sys.argv[1], 0, 4, None, 3, 0.25, sys.argv[2], workers=1)
""")


@pytest.mark.parametrize("where", ["writing rows", "committing"])
def test_a_killed_ingest_leaves_a_version_the_next_one_builds_on(folder: Path, tmp_path: Path, where: str):
    from ssl_lib.errors import DataError

    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    before = _state(out)
    _add_images(folder, {"cat": 3}, "new")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(folder), str(out), where], env=env)
    assert killed.returncode == -9
    after = _state(out)
    assert {n: after[n] for n in FILES[1:]} == {n: before[n] for n in FILES[1:]}
    if where == "writing rows":
        # Killed before the commit: the previous version reads as it was; the new rows lie past its last one.
        assert after["images.npy"].startswith(before["images.npy"])
        np.testing.assert_array_equal(load_prepared(out).images, np.load(io.BytesIO(before["images.npy"])))
    else:
        # Killed within the commit (after the header write, before the swap): readers refuse it.
        with pytest.raises(DataError, match="manifest.csv has 125 rows but images.npy has 128"):
            load_prepared(out)
    # Either way the next ingest builds on it: only the new files are decoded, into what a fresh ingest writes.
    assert ingest("folder", folder, **BUDGET, out_dir=out, workers=1)["decoded"] == 3
    ingest("folder", folder, **BUDGET, out_dir=tmp_path / "fresh", workers=1)
    _assert_same_images(out, tmp_path / "fresh")


def test_a_new_seed_draws_new_splits(folder: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    meta = ingest("folder", folder, **{**BUDGET, "seed": 1}, out_dir=out, workers=1)
    ingest("folder", folder, **{**BUDGET, "seed": 1}, out_dir=tmp_path / "fresh", workers=1)
    # Roles drawn with the old seed are not kept: the result is the new seed's own draw, and the crossings
    # between test and training are counted (the ingest stage warns about them).
    assert (out / "manifest.csv").read_bytes() == (tmp_path / "fresh" / "manifest.csv").read_bytes()
    assert meta["left_test"] > 0 and meta["entered_test"] > 0 and meta["data_version"] == 1


@pytest.mark.parametrize("decoders", ["processes", "threads"])
def test_parallel_ingest_equals_a_single_worker_and_reports_bad_files(folder: Path, tmp_path: Path, monkeypatch,
                                                                     decoders: str):
    from ssl_lib.data import files, image_file

    good = (folder / "cat" / "a000.png").read_bytes()
    (folder / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "eel" / "empty.png").write_bytes(b"")
    # Small as it is, hash it in worker processes, and decode it in worker processes or (too few files for
    # processes) in threads.
    monkeypatch.setattr(files, "MIN_PARALLEL_READS", 0)
    if decoders == "processes":
        monkeypatch.setattr(image_file, "MIN_PARALLEL_DECODES", 0)
    one = ingest("folder", folder, **BUDGET, out_dir=tmp_path / "one", workers=1)
    two = ingest("folder", folder, **BUDGET, out_dir=tmp_path / "two", workers=2)
    for name in FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    reasons = dict(two["skipped"])
    assert set(reasons) == {"cat/corrupt.png", "dog/truncated.png", "eel/empty.png"}
    assert all(r.startswith("not a readable image: ") for r in reasons.values())
    assert "truncated" in reasons["dog/truncated.png"] and "cannot identify" in reasons["eel/empty.png"]
    assert one["num_images"] == 125 and json.loads((tmp_path / "two" / "report.json").read_text())["num_skipped"] == 3

    # Incremental and parallel at once: reused rows and newly decoded ones land where a fresh ingest puts them.
    _add_images(folder, {"cat": 5, "eel": 5}, "new")
    ingest("folder", folder, **BUDGET, out_dir=tmp_path / "two", workers=2)
    ingest("folder", folder, **BUDGET, out_dir=tmp_path / "fresh", workers=1)
    _assert_same_images(tmp_path / "two", tmp_path / "fresh")


def test_the_fingerprint_moves_with_the_data_alone_and_reads_only_changed_files(folder: Path, tmp_path: Path,
                                                                               monkeypatch):
    from ssl_lib.data import files
    from ssl_lib.data.sources import source_fingerprint

    cache = tmp_path / "hashes.sqlite"
    first = source_fingerprint("folder", folder, cache_file=cache)
    read = files._read

    def no_reading(root, rel, st):
        raise AssertionError(f"{rel} was read although its size, mtime and inode are cached")

    monkeypatch.setattr(files, "_read", no_reading)
    assert source_fingerprint("folder", folder, cache_file=cache) == first
    monkeypatch.setattr(files, "_read", read)
    os.utime(folder / "cat" / "a000.png", (1, 1))  # read again (its mtime changed), same content: same fingerprint
    assert source_fingerprint("folder", folder, cache_file=cache) == first
    (folder / "fox").mkdir()  # a new, still empty class
    assert source_fingerprint("folder", folder, cache_file=cache)["class_names"] == ["cat", "dog", "eel", "fox"]
    (folder / "fox").rmdir()
    _add_images(folder, {"cat": 1}, "a", seed=1)  # cat/a000.png rewritten with other pixels
    changed = source_fingerprint("folder", folder, cache_file=cache)
    assert changed["source_version"] != first["source_version"] and changed["num_files"] == first["num_files"]



def test_the_hash_cache_writes_only_what_changed_and_survives_damage(folder: Path, tmp_path: Path, monkeypatch):
    from ssl_lib.data import files

    cache = tmp_path / "hashes.sqlite"
    cache.write_text('{"an older": "JSON cache"}')  # not a database: the scan reads every file and starts it afresh
    first = files.scan_files(folder, cache)
    assert files._HashCache(cache, folder).load() == {r.rel: r for r in first}
    written: list[int] = []
    write = files._HashCache._write
    monkeypatch.setattr(files._HashCache, "_write",
                        lambda self, changed, removed: (written.append(len(changed) + len(set(removed))),
                                                        write(self, changed, removed)))
    assert files.scan_files(folder, cache) == first and written == []  # nothing changed: nothing written
    _add_images(folder, {"dog": 2}, "new")
    (folder / "cat" / "a000.png").unlink()
    second = files.scan_files(folder, cache)
    assert written == [3]  # two rows in, one out; the rest of the cache is untouched
    assert files._HashCache(cache, folder).load() == {r.rel: r for r in second}
    assert files._HashCache(cache, tmp_path).load() == {}  # written for another folder: not used

_MEASURE = textwrap.dedent("""
    import resource, sys
    from ssl_lib.data.ingest import ingest

    if __name__ == "__main__":
        ingest("folder", sys.argv[1], 0, 2, None, 2, 0.2, sys.argv[2], workers=1)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
""")


def _peak_rss(folder: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), str(out)], capture_output=True, text=True,
                          env=env, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units differ off Linux")
def test_peak_memory_does_not_grow_with_the_image_count(tmp_path: Path):
    size, small, large = 128, 200, 1000
    _add_images(tmp_path / "small", {"a": small // 2, "b": small // 2}, "x", size=size)
    _add_images(tmp_path / "large", {"a": large // 2, "b": large // 2}, "x", size=size)
    added_pixels = (large - small) * size * size * 3
    growth = _peak_rss(tmp_path / "large", tmp_path / "out_l") - _peak_rss(tmp_path / "small", tmp_path / "out_s")
    # Pixels never sit in memory (blocks of rows are written and read through small windows): what grows with
    # the count is the bookkeeping per image (paths, hashes, the manifest), a few KB each. Holding the images
    # would grow the peak by at least the added pixels (39 MB here; ingest used to take 6x that).
    assert growth < 0.25 * added_pixels, (growth, added_pixels)


@pytest.mark.slow  # real DVC stages, MLflow included: about a minute
def test_dvc_repro_reruns_ingest_exactly_when_the_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    images = tmp_path / "images"
    _add_images(images, {"cat": 12, "dog": 12}, "a", size=8)
    project = make_project(tmp_path / "proj", {"data": {"source": "folder", "path": str(images),
                                                        "labels_per_class": 2, "val_per_class": 1}})
    use_project(project, monkeypatch)
    dvc = [sys.executable, "-m", "dvc", "repro", "ingest"]

    def ingest_ran() -> bool:
        out = run_cmd(dvc, project).stdout
        assert "Running stage 'fingerprint'" in out, out  # the fingerprint stage runs every time
        return "Running stage 'ingest'" in out

    assert ingest_ran()
    os.utime(images / "cat" / "a000.png", (1, 1))  # touched, same content
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["workers"] = 1  # how fast, not what
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert not ingest_ran()

    _add_images(images, {"dog": 3}, "new", size=8)
    (images / "cat" / "a001.png").unlink()
    assert ingest_ran()
    lineage = json.loads((project / "data/prepared/lineage.json").read_text())
    assert lineage["data_version"] == 2
    assert (lineage["versions"][-1]["added"], lineage["versions"][-1]["removed"]) == (3, ["cat/a001.png"])
    assert not ingest_ran()


def test_a_new_source_starts_a_new_lineage_instead_of_removing_the_old_one(folder: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    ingest("folder", folder, **BUDGET, out_dir=out, workers=1)
    other = tmp_path / "other"
    _add_images(other, {"ant": 12, "bee": 12}, "b", seed=1)
    second = ingest("folder", other, **BUDGET, out_dir=out, workers=1)
    lineage = json.loads((out / "lineage.json").read_text())
    # Another folder: its images are all added to a lineage of its own, none of the old folder's are "removed".
    assert (second["data_version"], second["removed"], second["added"]) == (1, [], 24)
    assert [v["data_version"] for v in lineage["versions"]] == [1] and lineage["root"] == str(other)
    assert lineage["follows"] == {"source": "folder", "root": str(folder), "data_version": 1}
    assert (_manifest(out)["version"] == 1).all()
    # Growing it continues that lineage.
    _add_images(other, {"ant": 2}, "c", seed=2)
    third = ingest("folder", other, **BUDGET, out_dir=out, workers=1)
    assert (third["data_version"], third["added"]) == (2, 2)
    assert json.loads((out / "lineage.json").read_text())["follows"]["root"] == str(folder)


def test_a_logged_file_list_shows_the_first_few_then_a_count():
    from tasks.ingest import _listed

    lines = _listed([f"cat/{i:04d}.png" for i in range(5000)]).splitlines()
    assert len(lines) == 21 and lines[0] == "cat/0000.png" and lines[-1].strip() == "... and 4980 more"
