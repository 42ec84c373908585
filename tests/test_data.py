"""Tests for ssl_lib.data: sources, splits, the prepared on-disk format and every user mistake."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_lib.data.idx import read_idx, write_idx
from ssl_lib.data.ingest import ingest
from ssl_lib.data.prepared import load_prepared
from ssl_lib.data.sources import FASHION_MNIST_CLASSES, load_source
from ssl_lib.data.splits import assign_splits
from ssl_lib.errors import DataError

FILES = ("images.npy", "pool_indices.npy", "manifest.csv", "meta.json", "report.json")
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _ingest_digits(out: Path, seed: int = 0, **overrides) -> dict:
    kwargs = dict(source="digits", path=None, seed=seed, labels_per_class=5, label_fraction=None,
                  val_per_class=5, test_fraction=0.2, out_dir=out)
    kwargs.update(overrides)
    return ingest(**kwargs)


# --------------------------------------------------------------------------- digits end to end

@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("digits")
    meta = _ingest_digits(base / "a")
    _ingest_digits(base / "b")
    return base / "a", base / "b", meta


def test_digits_split_counts_are_exact(digits_dirs):
    a, _, meta = digits_dirs
    prepared = load_prepared(a)
    m = prepared.manifest
    assert len(m) == 1797 and meta["num_images"] == 1797
    assert meta["shape"] == [8, 8, 1] and meta["class_names"] == [str(i) for i in range(10)]
    for c in range(10):
        rows = m[m["label"] == c]
        n = len(rows)
        counts = rows["split"].value_counts().to_dict()
        assert counts["test"] == round(0.2 * n)  # stratified: each class gets its own 20 %
        assert counts["val"] == 5
        assert counts["labeled"] == 5
        assert counts["unlabeled"] == n - round(0.2 * n) - 10
    assert meta["split_counts"]["labeled"] == 50 and meta["split_counts"]["val"] == 50
    assert sum(meta["split_counts"].values()) == 1797
    assert meta["skipped"] == [] and meta["num_skipped"] == 0


def test_digits_pixels_are_rescaled_to_uint8(digits_dirs):
    from sklearn.datasets import load_digits

    prepared = load_prepared(digits_dirs[0])
    assert prepared.images.dtype == np.uint8 and isinstance(prepared.images, np.memmap)
    expected = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(prepared.images[..., 0], expected)
    assert prepared.images.max() == 255


def test_digits_source_reads_what_scikit_learns_loader_reads():
    import sklearn
    from sklearn.datasets import load_digits

    from ssl_lib.data.sources import load_digits as load_digits_source

    ours, theirs = load_digits_source(), load_digits()
    np.testing.assert_array_equal(ours.images[..., 0], np.rint(theirs.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(ours.labels, theirs.target)
    assert ours.class_names == [str(c) for c in theirs.target_names]
    assert ours.source_version == f"sklearn-{sklearn.__version__}"


def test_two_ingests_are_byte_identical(digits_dirs, tmp_path):
    a, b, _ = digits_dirs
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    _ingest_digits(tmp_path / "other", seed=1)
    assert (a / "manifest.csv").read_bytes() != (tmp_path / "other" / "manifest.csv").read_bytes()
    _ingest_digits(tmp_path / "other")  # overwriting an existing prepared dir works
    assert (a / "manifest.csv").read_bytes() == (tmp_path / "other" / "manifest.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no temp dirs left behind


def test_test_images_never_in_pretrain_pool(digits_dirs):
    prepared = load_prepared(digits_dirs[0])
    m = prepared.manifest
    test_ids = set(m.loc[m["split"] == "test", "index"])
    for split in ("unlabeled", "labeled", "val"):
        assert test_ids.isdisjoint(m.loc[m["split"] == split, "index"])
    pool = prepared.pretrain_pool()
    assert len(pool) == 1797 - len(test_ids)
    # The pool really is the non-test pixels, in manifest order.
    np.testing.assert_array_equal(pool, prepared.images[np.sort(list(set(range(1797)) - test_ids))])
    x, y = prepared.split("labeled")
    assert x.shape == (50, 8, 8, 1) and sorted(np.bincount(y)) == [5] * 10


def test_meta_stats_ignore_test_images(digits_dirs):
    prepared = load_prepared(digits_dirs[0])
    pixels = prepared.pretrain_pool().astype(np.float64) / 255
    assert prepared.meta["mean"][0] == pytest.approx(pixels.mean(), abs=1e-6)
    assert prepared.meta["std"][0] == pytest.approx(pixels.std(), abs=1e-6)
    report = json.loads((digits_dirs[0] / "report.json").read_text())
    assert report == {"skipped": [], "num_skipped": 0}


def test_splits_are_nested_across_label_budgets():
    labels = np.repeat(np.arange(3), 40)
    no_test = np.zeros(len(labels), bool)
    small = assign_splits(labels, no_test, 7, 2, None, 3, 0.25)
    large = assign_splits(labels, no_test, 7, 6, None, 3, 0.25)
    # Same seed: same test and val, and the bigger labeled set contains the smaller one.
    np.testing.assert_array_equal(small == "test", large == "test")
    np.testing.assert_array_equal(small == "val", large == "val")
    assert np.all(large[small == "labeled"] == "labeled")
    np.testing.assert_array_equal(small, assign_splits(labels, no_test, 7, 2, None, 3, 0.25))


def test_label_fraction_and_unlabeled_images():
    labels = np.concatenate([np.repeat(np.arange(2), 30), np.full(10, -1)])
    splits = assign_splits(labels, np.zeros(len(labels), bool), 0, None, 0.1, 2, 0.2)
    assert np.all(splits[labels == -1] == "unlabeled")  # unlabeled images are never test
    for c in range(2):
        s = splits[labels == c]
        assert (s == "test").sum() == 6 and (s == "val").sum() == 2
        assert (s == "labeled").sum() == max(1, round(0.1 * (30 - 6 - 2)))


def test_predefined_test_is_used_as_is():
    labels = np.repeat(np.arange(2), 10)
    predefined = np.zeros(20, bool)
    predefined[[0, 1, 10]] = True
    splits = assign_splits(labels, predefined, 0, 2, None, 1, 0.5)  # test_fraction ignored
    np.testing.assert_array_equal(splits == "test", predefined)


# --------------------------------------------------------------------------- fashion-mnist

@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_files():
    raw = load_source("fashion-mnist", None)
    assert raw.images.shape == (70000, 28, 28, 1) and raw.images.dtype == np.uint8
    assert raw.predefined_test.sum() == 10000 and not raw.predefined_test[:60000].any()
    assert np.bincount(raw.labels[:60000]).tolist() == [6000] * 10
    assert np.bincount(raw.labels[60000:]).tolist() == [1000] * 10
    assert raw.class_names == FASHION_MNIST_CLASSES
    assert raw.source_ids[0] == "train/00000" and raw.source_ids[60000] == "test/00000"
    assert raw.source_version.startswith("sha256:")
    splits = assign_splits(raw.labels, raw.predefined_test, 0, 100, None, 50, 0.0)
    assert (splits == "labeled").sum() == 1000 and (splits == "val").sum() == 500
    assert (splits == "test").sum() == 10000 and (splits == "unlabeled").sum() == 58500


def _write_tiny_fashion(directory: Path, gz: bool = True, n_train: int = 12, n_test: int = 4) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_train, 5, 4), np.uint8))
    write_idx(directory / f"train-labels-idx1-ubyte{ext}", np.arange(n_train, dtype=np.uint8) % 10)
    write_idx(directory / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_test, 5, 4), np.uint8))
    write_idx(directory / f"t10k-labels-idx1-ubyte{ext}", np.arange(n_test, dtype=np.uint8) % 10)
    return directory


@pytest.mark.parametrize("gz", [True, False])
def test_tiny_idx_source(tmp_path, gz):
    raw = load_source("fashion-mnist", _write_tiny_fashion(tmp_path, gz=gz))
    assert raw.images.shape == (16, 5, 4, 1)
    assert raw.labels.tolist() == [i % 10 for i in range(12)] + [0, 1, 2, 3]
    assert raw.predefined_test.tolist() == [False] * 12 + [True] * 4
    # gz and plain copies of the same data share a version.
    other = load_source("fashion-mnist", _write_tiny_fashion(tmp_path / "x", gz=not gz))
    assert other.source_version == raw.source_version


def test_idx_round_trip_and_corruption(tmp_path):
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "a.idx", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx", expected_ndim=3), array)

    data = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(data[:-7])
    with pytest.raises(DataError, match="short.idx is truncated"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x12\x34" + data[2:])
    with pytest.raises(DataError, match="magic.idx is not an IDX file"):
        read_idx(tmp_path / "magic.idx")
    with pytest.raises(DataError, match="expected 1"):
        read_idx(tmp_path / "a.idx", expected_ndim=1)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data)[:-10])
    with pytest.raises(DataError, match="cut.gz is a corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")


def test_corrupt_fashion_file_names_the_file(tmp_path):
    d = _write_tiny_fashion(tmp_path)
    bad = d / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_source("fashion-mnist", d)


def test_fashion_mismatched_counts(tmp_path):
    d = _write_tiny_fashion(tmp_path)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="12 images but .* 5 labels"):
        load_source("fashion-mnist", d)


def test_fashion_fallbacks_without_path(tmp_path, monkeypatch):
    from ssl_lib.data import sources

    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(sources, "_download_fashion_mnist", lambda cache: (None, "download failed (offline)"))
    with pytest.raises(DataError, match="offline.*apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", None)

    def fake_download(cache):  # what torchvision leaves behind: <cache>/FashionMNIST/raw
        return _write_tiny_fashion(cache / "FashionMNIST" / "raw", gz=False), ""

    monkeypatch.setattr(sources, "_download_fashion_mnist", fake_download)
    assert load_source("fashion-mnist", None).images.shape == (16, 5, 4, 1)
    monkeypatch.setattr(sources, "_download_fashion_mnist", lambda cache: pytest.fail("cache ignored"))
    assert load_source("fashion-mnist", None).images.shape == (16, 5, 4, 1)


def test_fashion_missing_files_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_source("fashion-mnist", tmp_path)
    assert "data.path" in str(info.value)


# --------------------------------------------------------------------------- folder

def _save(path: Path, colour, size=(6, 4), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for i in range(4):
        _save(root / "cat" / f"c{i}.png", (200, 10 * i, 10))
        _save(root / "dog" / f"d{i}.JPG", (10, 10, 200))
        _save(root / "eel" / f"e{i}.bmp", 100 + i, mode="L")
    _save(root / "dog" / "odd.png", (1, 2, 3), size=(10, 10))  # different size: gets resized
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("not an image, ignored")
    _save(root / "stray.png", (5, 5, 5))  # root file: unlabeled
    _save(root / "unlabeled" / "u0.webp", (9, 9, 9))
    _save(root / "test" / "cat" / "t0.png", (250, 0, 0))
    _save(root / "test" / "eel" / "t1.png", 77, mode="L")
    _save(root / "test" / "loose.png", 1, mode="L")  # test image without class: skipped
    return root


def test_folder_source(image_folder, tmp_path):
    raw = load_source("folder", image_folder)  # listed and hashed, not decoded
    assert raw.class_names == ["cat", "dog", "eel"]
    assert len(raw.source_ids) == 17 and raw.size_wh == (6, 4)  # most common size (w6, h4), from the headers
    assert raw.keys == [hashlib.sha256((image_folder / s).read_bytes()).hexdigest() for s in raw.source_ids]
    ids = dict(zip(raw.source_ids, raw.labels.tolist(), strict=True))
    assert ids["stray.png"] == -1 and ids["unlabeled/u0.webp"] == -1
    assert ids["cat/c0.png"] == 0 and ids["dog/d3.JPG"] == 1 and ids["eel/e0.bmp"] == 2
    assert ids["test/eel/t1.png"] == 2
    test_ids = {s for s, t in zip(raw.source_ids, raw.predefined_test, strict=True) if t}
    assert test_ids == {"test/cat/t0.png", "test/eel/t1.png"}
    assert raw.source_ids == sorted(raw.source_ids)
    skipped = dict(raw.skipped)
    assert set(skipped) == {"dog/broken.png", "test/loose.png"}
    assert "not a readable image" in skipped["dog/broken.png"]
    ingest("folder", str(image_folder), 0, 1, None, 1, 0.5, tmp_path / "prep", workers=1)
    prepared = load_prepared(tmp_path / "prep")
    assert prepared.images.shape == (17, 4, 6, 3)  # any colour -> RGB
    assert prepared.manifest["source_id"].tolist() == raw.source_ids and prepared.manifest["key"].tolist() == raw.keys
    grey = prepared.images[raw.source_ids.index("eel/e1.bmp")]
    assert np.all(grey == 101)  # grey images are replicated into all three channels
    assert np.all(prepared.images[raw.source_ids.index("dog/odd.png")] == (1, 2, 3))  # resized


def test_folder_ingest_reports_skipped(image_folder, tmp_path):
    out = tmp_path / "prep"
    meta = ingest("folder", str(image_folder), 0, 1, None, 1, 0.5, out)
    assert meta["num_skipped"] == 2
    assert [path for path, _ in meta["skipped"]] == ["dog/broken.png", "test/loose.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["num_skipped"] == 2 and report["skipped"][0]["path"] == "dog/broken.png"
    m = load_prepared(out).manifest
    assert m.loc[m["source_id"] == "stray.png", "split"].item() == "unlabeled"
    assert set(m.loc[m["source_id"].str.startswith("test/"), "split"]) == {"test"}
    assert meta["split_counts"] == {"unlabeled": 9, "labeled": 3, "val": 3, "test": 2}


def test_folder_greyscale_and_explicit_size(tmp_path):
    for i in range(2):
        _save(tmp_path / "src" / "a" / f"{i}.png", 10, size=(8, 8), mode="L")
        _save(tmp_path / "src" / "b" / f"{i}.gif", (30, 30, 30), size=(5, 7))  # grey content in RGB mode
    meta = ingest("folder", tmp_path / "src", 0, 1, None, 0, 0.0, tmp_path / "out", image_size=(3, 4))
    assert meta["shape"] == [3, 4, 1]  # every image grey (the RGB gifs too): one channel


# --------------------------------------------------------------------------- bad input

def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_unknown_source_lists_choices():
    with pytest.raises(DataError, match="fashion-mnist, digits, folder"):
        load_source("cifar", None)


def test_folder_missing(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        load_source("folder", None)
    with pytest.raises(DataError, match="not a directory"):
        load_source("folder", tmp_path / "nope")


def test_folder_without_readable_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images"):
        load_source("folder", tmp_path)


def test_impossible_budget_names_class_and_keys(image_folder, tmp_path):
    with pytest.raises(DataError) as info:
        ingest("folder", image_folder, 0, 4, None, 1, 0.0, tmp_path / "out")
    message = str(info.value)
    for part in ("'cat'", "only 4", "data.labels_per_class", "data.val_per_class"):
        assert part in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lpc, frac", [(5, 0.1), (None, None)])
def test_exactly_one_label_budget(lpc, frac):
    with pytest.raises(DataError, match="exactly one of data.labels_per_class"):
        assign_splits(np.zeros(10, np.int64), np.zeros(10, bool), 0, lpc, frac, 1, 0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(label_fraction=1.5, labels_per_class=None), "label_fraction"),
    (dict(test_fraction=1.0), "test_fraction"),
    (dict(val_per_class=-1), "val_per_class"),
    (dict(seed=-3), "seed"),
])
def test_bad_split_settings(kwargs, match):
    args = dict(labels=np.zeros(10, np.int64), predefined_test=np.zeros(10, bool), seed=0,
                labels_per_class=1, label_fraction=None, val_per_class=1, test_fraction=0.2)
    args.update(kwargs)
    with pytest.raises(DataError, match=match):
        assign_splits(**args)


def test_load_prepared_missing_or_corrupt(digits_dirs, tmp_path):
    with pytest.raises(DataError, match="dvc repro ingest"):
        load_prepared(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in FILES:
        (broken / name).write_bytes((digits_dirs[0] / name).read_bytes())
    (broken / "images.npy").write_bytes(b"nonsense")
    with pytest.raises(DataError, match="corrupt.*dvc repro ingest"):
        load_prepared(broken)
    (broken / "images.npy").unlink()
    with pytest.raises(DataError, match="lacks images.npy"):
        load_prepared(broken)
    with pytest.raises(DataError, match="unknown split"):
        load_prepared(digits_dirs[0]).split("training")


def test_label_budget_changes_only_the_manifest(digits_dirs, tmp_path):
    """Pretraining reads images, pool and meta: a new label budget must leave them byte-identical."""
    from ssl_lib.data.prepared import load_pool

    _ingest_digits(tmp_path / "more", labels_per_class=20, val_per_class=2)
    for name in ("images.npy", "pool_indices.npy", "meta.json", "report.json"):
        assert (tmp_path / "more" / name).read_bytes() == (digits_dirs[0] / name).read_bytes(), name
    assert (tmp_path / "more" / "manifest.csv").read_bytes() != (digits_dirs[0] / "manifest.csv").read_bytes()
    pool, meta = load_pool(digits_dirs[0])
    np.testing.assert_array_equal(pool, load_prepared(digits_dirs[0]).pretrain_pool())
    assert meta["num_test"] == 1797 - len(pool)


# --------------------------------------------------------------------------- which errors are the user's

def test_too_few_labels_is_a_label_budget_error():
    from ssl_lib.errors import LabelBudgetError, UserError

    labels = np.repeat(np.arange(2), 6)
    with pytest.raises(LabelBudgetError, match="data.labels_per_class") as info:
        assign_splits(labels, np.zeros(len(labels), bool), 0, 5, None, 3, 0.2)
    assert isinstance(info.value, DataError) and isinstance(info.value, UserError)


def test_no_labeled_image_is_a_label_budget_error():
    from ssl_lib.errors import LabelBudgetError

    with pytest.raises(LabelBudgetError, match="no labeled images.*sub-folder"):
        assign_splits(np.full(10, -1), np.zeros(10, bool), 0, 1, None, 0, 0.2)


def test_test_fraction_that_rounds_to_no_test_image_is_a_label_budget_error():
    from ssl_lib.errors import LabelBudgetError

    labels = np.repeat(np.arange(3), 2)  # 0.2 of 2 images rounds to 0 in every class
    with pytest.raises(LabelBudgetError, match="data.test_fraction"):
        assign_splits(labels, np.zeros(len(labels), bool), 0, 1, None, 0, 0.2)
    # test_fraction 0 asks for no test split: not an error.
    assert "test" not in assign_splits(labels, np.zeros(len(labels), bool), 0, 1, None, 0, 0.0)


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    from ssl_lib.errors import UserError

    (tmp_path / "bad.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # says 9 bytes, holds 3
    with pytest.raises(UserError, match="bad.idx is truncated"):
        read_idx(tmp_path / "bad.idx")
    with pytest.raises(DataError, match="does not exist; point data.path"):
        read_idx(tmp_path / "missing.idx")


def test_broken_internal_invariants_are_not_user_errors(tmp_path):
    """A loader or caller bug keeps a plain ValueError (and its traceback), never a one-line user error."""
    from ssl_lib.data.sources import RawDataset
    from ssl_lib.errors import UserError

    with pytest.raises(ValueError) as info:
        RawDataset(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64), source_ids=["a", "b"],
                   predefined_test=np.zeros(2, bool), class_names=["x"], source="test", source_version="0")
    assert not isinstance(info.value, UserError)
    with pytest.raises(ValueError) as info:
        assign_splits(np.zeros(2, np.int64), np.zeros(2, bool), 0, 1, None, 0, 0.2, keys=["a"])
    assert not isinstance(info.value, UserError)
    with pytest.raises(ValueError) as info:
        assign_splits(np.zeros((2, 2), np.int64), np.zeros(4, bool), 0, 1, None, 0, 0.2)
    assert not isinstance(info.value, UserError)
    with pytest.raises(ValueError) as info:
        write_idx(tmp_path / "c.idx", np.zeros(3, np.complex64))
    assert not isinstance(info.value, UserError)


def test_content_scores_are_the_documented_hash():
    """Each score is blake2b-64 of seed, stream and key over 2**64, exactly: a folder's splits depend on it."""
    import hashlib

    from ssl_lib.data.splits import content_scores

    keys = ["", "a", "cat/001.png", "ü", *(hashlib.sha256(str(i).encode()).hexdigest() for i in range(500))]
    expected = [int.from_bytes(hashlib.blake2b(b"7\x001\x00" + k.encode(), digest_size=8).digest(), "big") / 2.0**64
                for k in keys]
    assert content_scores(7, 1, keys).tolist() == expected
    assert content_scores(7, 1, []).shape == (0,)
