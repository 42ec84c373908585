"""Where `make run`'s wall time goes: the stages' own work against process start-up, DVC and Prefect.

Runs the pipeline flow once, in-process, in a fresh copy of this repository (its tracked files, a new git
repo, the default params unless --set says otherwise), with every stage forced to run, and splits the flow's
wall time into:

* stage work: each stage process, from the start of its work (params loaded... through outputs written);
* stage start-up: each stage process, from its creation to the start of its work (interpreter, imports);
* DVC: each `dvc repro --single-item` around its stage process (DVC's start-up, hashing, dvc.lock);
* Prefect and flow: the rest (the flow's server and task runs, the MLflow parent run, the label-budget check).

Also times a cold `import` of each heavy module in a fresh interpreter, so the start-up column can be read.
The overhead target of issue #11 is <= 10 % of the run. Run it on a quiet machine:

    .venv/bin/python benchmarks/pipeline_overhead.py                      # the default run (~11 min)
    .venv/bin/python benchmarks/pipeline_overhead.py --in-place           # ... in this repository
    .venv/bin/python benchmarks/pipeline_overhead.py --set pretrain.epochs=1 --set self_train.rounds=1
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch", "mlflow", "prefect", "pandas", "dvc.repo")


def cold_import_seconds(module: str) -> float:
    """Median of three cold imports of ``module``, each in a new interpreter (minus a bare interpreter)."""
    def once(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        return time.perf_counter() - start

    bare = sorted(once("pass") for _ in range(3))[1]
    return sorted(once(f"import {module}") for _ in range(3))[1] - bare


def copy_project(target: Path) -> Path:
    """The repository's tracked files in a new git repo: what a fresh clone holds, without its history."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file() and not name.startswith(("artifacts/", "results/", "data/prepared")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark copy"]):
        subprocess.run(args, cwd=target, check=True, capture_output=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a params override, key=value")
    parser.add_argument("--keep", action="store_true", help="keep the project copy (its path is printed)")
    parser.add_argument("--in-place", action="store_true",
                        help="run in this repository instead of a copy (as `make run` does, every stage forced): "
                             "its dvc.lock, results and MLflow store get the run")
    args = parser.parse_args()

    from ssl_lib.config import parse_override
    from tasks.environment import configure_environment

    imports = {module: cold_import_seconds(module) for module in HEAVY_MODULES}
    workdir = Path(tempfile.mkdtemp(prefix="sslpipe-overhead-"))
    root = REPO if args.in_place else copy_project(workdir)
    os.environ["SSLPIPE_ROOT"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    configure_environment()
    overrides = dict(parse_override(text) for text in args.sets)
    from flows.pipeline import ssl_pipeline  # imports Prefect: part of the CLI's start-up, timed below

    label = ", ".join(args.sets) or "default params"
    started = time.perf_counter()
    summary = ssl_pipeline(overrides=overrides, root=str(root), force=True, save_experiment=False)
    total = time.perf_counter() - started
    _print_split(summary["stages"], total, f"{label}, every stage forced")
    metrics = summary["metrics"]
    print(f"\nmetrics: baseline {metrics['baseline']['accuracy']:.4f}, SSL {metrics['ssl']['accuracy']:.4f}"
          + (f", SSL + self-training {metrics['self_train']['accuracy']:.4f}" if "self_train" in metrics else ""))
    print("\n| cold import, fresh interpreter | seconds |")
    print("|---|---|")
    for module, seconds in imports.items():
        print(f"| `{module}` | {seconds:.2f} |")
    if args.keep and not args.in_place:
        print(f"\nproject copy: {root}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _print_split(stages: list[dict], total: float, title: str) -> None:
    """Print one run's split of its wall time."""
    work = sum(s["work_seconds"] or 0.0 for s in stages)
    startup = sum(s["startup_seconds"] or 0.0 for s in stages)
    dvc = sum(s["seconds"] for s in stages) - work - startup
    prefect = total - sum(s["seconds"] for s in stages)
    print(f"\nFlow wall time {total:.1f} s ({title}).\n")
    print("| stage | DVC wall (s) | process start-up (s) | work (s) |")
    print("|---|---|---|---|")
    for s in stages:
        print(f"| {s['stage']} | {s['seconds']:.1f} | {s['startup_seconds'] or 0:.1f} | {s['work_seconds'] or 0:.1f} |")
    print("\n| part | seconds | share of the run |")
    print("|---|---|---|")
    for name, seconds in (("stage work", work), ("stage process start-up", startup), ("DVC", dvc),
                          ("Prefect and flow", prefect)):
        print(f"| {name} | {seconds:.1f} | {seconds / total:.1%} |")
    print(f"| **overhead (all but stage work)** | {total - work:.1f} | **{(total - work) / total:.1%}** |")


if __name__ == "__main__":
    main()
