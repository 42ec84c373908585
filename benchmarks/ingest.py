"""Ingest of a folder source: peak memory, decode throughput with 1 worker and with all cores, and re-ingest.

Generates a synthetic folder (RGB PNGs, 96x96 by default, in 10 class folders; kept in --dir and reused while
it has the asked count), reads every file once (untimed: every run then reads the folder from the page cache),
then runs each ingest in a fresh Python process and prints a table:

* full ingest with 1 worker (the process pinned to one core, so that nothing in it runs in parallel), with 2
  and with every core (``data.workers``), each into a new output directory and with a cold file-hash cache:
  wall time of the ingest call, images/s, peak RSS;
* the speed-up from 1 worker to 2 and to all cores;
* re-ingest after adding 1 % new images, building on the all-cores output (as the ingest stage does): only the
  new files are decoded, and their rows appended to the previous images.npy (checked: the same file afterwards);
  its time as a share of the full ingest's;
* the fingerprint of the unchanged folder with a warm hash cache: what every `dvc repro` pays.

Before each run the file system is synced (``os.sync``), so that no run pays for writing back the previous run's
output. Peak RSS is polled (every 20 ms) as the sum over the ingest process and its worker processes, and read as the
ingest process's own ru_maxrss. Targets (issue #14): 100,000 images in <= 1 GB, >= 1.7x from 1 to 2 cores,
re-ingest after 1 % new <= 10 % of the full ingest's time. images/s counts the images decoded over the whole
ingest call (listing and hashing the files, decoding, statistics, manifest). For 100,000 images --dir needs about
7 GB free (the PNGs, and an images.npy of 2.8 GB, which the re-ingest grows). Run it alone on a quiet machine:

    .venv/bin/python benchmarks/ingest.py --images 100000
    .venv/bin/python benchmarks/ingest.py --images 2000          # a quick check that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CLASSES = 10
NEW_PREFIX = "zz_new_"  # the 1 % added for the re-ingest, removed again afterwards
_GENERATED = ".generated.json"

_RUN = textwrap.dedent("""
    import json, os, resource, sys, time

    if __name__ == "__main__":
        folder, out, workers, cache = sys.argv[1:5]
        if int(workers) == 1:
            # One core, not just one decoding process: listing and hashing use every core this process may
            # use, and its worker processes inherit the affinity.
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from ssl_lib.data.ingest import ingest

        start = time.perf_counter()
        meta = ingest("folder", folder, 0, 10, None, 10, 0.2, out, workers=int(workers), cache_file=cache)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "decoded": meta["decoded"], "reused": meta["reused"],
                          "num_images": meta["num_images"],
                          "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")

_FINGERPRINT = textwrap.dedent("""
    import json, sys, time
    from ssl_lib.data.sources import source_fingerprint

    if __name__ == "__main__":
        start = time.perf_counter()
        source_fingerprint("folder", sys.argv[1], cache_file=sys.argv[2])
        print(json.dumps({"seconds": time.perf_counter() - start}))
""")


def _draw(index: int, size: int, seed: int):
    """A synthetic photo-like image: a colour gradient, a few rectangles and mild noise (compresses like photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    ramp = np.linspace(0.0, 1.0, size)
    low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    image = low + (high - low) * ramp[:, None, None] * rng.uniform(0.5, 1.0, 3)
    image = np.broadcast_to(image, (size, size, 3)).copy()
    for _ in range(4):
        y, x = rng.integers(0, size - 8, 2)
        h, w = rng.integers(4, size // 2, 2)
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _write(job: tuple[str, int, int, int, int, str]) -> None:
    root, start, stop, size, seed, prefix = job
    for i in range(start, stop):
        path = Path(root) / f"class{i % CLASSES}" / f"{prefix}{i:07d}.png"
        _draw(i, size, seed).save(path)


def generate(root: Path, count: int, size: int, seed: int = 0, prefix: str = "img", workers: int = 1) -> None:
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(str(root), s, min(s + step, count), size, seed, prefix) for s in range(0, count, step)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write, jobs))


def ensure_folder(root: Path, count: int, size: int, workers: int) -> None:
    marker = root / _GENERATED
    wanted = {"images": count, "size": size}
    for stale in root.glob(f"class*/{NEW_PREFIX}*"):
        stale.unlink()
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    shutil.rmtree(root, ignore_errors=True)
    print(f"generating {count} RGB {size}x{size} PNGs in {root} ...", flush=True)
    start = time.perf_counter()
    generate(root, count, size, workers=workers)
    marker.write_text(json.dumps(wanted))
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def warm_page_cache(root: Path) -> None:
    """Read every file once, untimed, so that each timed run reads the folder from memory: otherwise the first run
    (1 worker) alone pays for the disk and the speed-up from 1 to 2 workers is the disk's, not the decoding's."""
    start = time.perf_counter()
    for path in root.rglob("*.png"):
        path.read_bytes()
    print(f"  page cache warmed in {time.perf_counter() - start:.0f} s", flush=True)


def measure(code: str, *args: str) -> tuple[dict, int]:
    """Run ``code`` in a new interpreter; return what it printed (JSON) and the peak RSS of it and its children."""
    import psutil

    # The previous run's written gigabytes reach the disk first, not during this run: a re-ingest in use comes
    # long after the ingest before it.
    os.sync()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = parent.memory_info().rss
                for child in parent.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                break
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), peak


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="images in the synthetic folder")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "sslpipe-ingest-bench",
                        help="where the synthetic folder is kept (and reused) and the outputs are written")
    parser.add_argument("--new", type=float, default=0.01, help="share of new images for the re-ingest")
    args = parser.parse_args()

    from ssl_lib.data.files import default_workers

    cores = default_workers()
    folder, work = args.dir / f"folder-{args.images}-{args.size}", args.dir / "runs"
    ensure_folder(folder, args.images, args.size, cores)
    warm_page_cache(folder)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pixels = args.images * args.size * args.size * 3
    print(f"{args.images} images, {_mb(pixels)} of pixels, {cores} cores; each run in a new process", flush=True)

    rows = []
    full: dict[int, dict] = {}
    for workers in sorted({1, min(2, cores), cores}):
        result, peak = measure(_RUN, str(folder), str(work / f"out-{workers}"), str(workers),
                               str(work / f"hashes-{workers}.json"))
        full[workers] = result
        rows.append((f"full ingest, {workers} worker{'s' if workers > 1 else ''}", result["seconds"],
                     result["decoded"] / result["seconds"], peak, result["self_maxrss"]))
        print(f"  {rows[-1][0]}: {result['seconds']:.1f} s", flush=True)
        if workers != cores:  # only the all-cores output is built on below: free its disk space
            shutil.rmtree(work / f"out-{workers}")

    added = max(1, round(args.new * args.images))
    generate(folder, added, args.size, seed=1, prefix=NEW_PREFIX, workers=cores)
    grown = work / f"out-{cores}" / "images.npy"
    inode = grown.stat().st_ino
    try:
        again, peak = measure(_RUN, str(folder), str(work / f"out-{cores}"), str(cores),
                              str(work / f"hashes-{cores}.json"))
        assert again["decoded"] == added, again
        assert grown.stat().st_ino == inode, "the re-ingest copied images.npy instead of appending to it"
        rows.append((f"re-ingest after {added} new ({args.new:.0%})", again["seconds"], None, peak,
                     again["self_maxrss"]))
        fingerprint, peak = measure(_FINGERPRINT, str(folder), str(work / f"hashes-{cores}.json"))
        rows.append(("fingerprint, unchanged folder (warm hash cache)", fingerprint["seconds"], None, peak, None))
    finally:
        for path in folder.glob(f"class*/{NEW_PREFIX}*"):
            path.unlink()

    print()
    print("| run | seconds | images/s | peak RSS, all processes | peak RSS, ingest process |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, rate, peak, self_peak in rows:
        print(f"| {name} | {seconds:.1f} | {'' if rate is None else f'{rate:,.0f}'} | {_mb(peak)} | "
              f"{'' if self_peak is None else _mb(self_peak)} |")
    print()
    one = full[1]["seconds"]
    for workers in sorted(full):
        if workers > 1:
            print(f"speed-up 1 -> {workers} workers: {one / full[workers]['seconds']:.2f}x")
    print(f"re-ingest after {args.new:.0%} new: {again['seconds'] / full[cores]['seconds']:.1%} of the full "
          f"ingest's time ({cores} workers)")


if __name__ == "__main__":
    main()
