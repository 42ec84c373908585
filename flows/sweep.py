"""Experiment sweeps: methods x label budgets x seeds, each point a DVC experiment and an MLflow run.

Every point runs as ``dvc exp run --temp`` (a temporary copy of the workspace), so points can run in
parallel and the workspace is left alone; DVC's run cache restores stages whose inputs were seen
before (a new label budget reuses the pretrained encoder). Each point gets one MLflow run in the
sweep's experiment, with the stages nested under it. Parallel points need a tracking server
(``MLFLOW_TRACKING_URI=http://...``): SQLite does not take concurrent writers.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.stages import (
    StageUserError,
    dvc_command,
    read_stage_report,
    retry_unless_user_error,
    stage_failure,
    subprocess_env,
    user_error_from,
)
from tasks.checkout_lock import hold_checkout
from tasks.environment import configure_environment, project_root
from tasks.run_summary import headline_metrics


@dataclass(frozen=True)
class SweepPoint:
    method: str
    labels_per_class: int
    seed: int

    @property
    def overrides(self) -> dict[str, Any]:
        return {"pretrain.method": self.method, "data.labels_per_class": self.labels_per_class,
                "data.label_fraction": None, "seed": self.seed}

    def name(self, sweep_id: str) -> str:
        return f"{sweep_id}-{self.method}-l{self.labels_per_class}-s{self.seed}".replace("_", "-")


def _dvc_set_args(overrides: dict[str, Any]) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={'null' if value is None else value}"]
    return args


def _read_exp_metrics(root: Path, exp_name: str) -> dict:
    """results/metrics.json as committed in experiment ``exp_name``."""
    ref = subprocess.run(["git", "rev-parse", f"refs/exps/{_exp_ref(root, exp_name)}"], cwd=root,
                         capture_output=True, text=True)
    rev = ref.stdout.strip() if ref.returncode == 0 else exp_name
    shown = subprocess.run(["git", "show", f"{rev}:results/metrics.json"], cwd=root, capture_output=True, text=True)
    if shown.returncode != 0:
        raise RuntimeError(f"experiment {exp_name} has no results/metrics.json: {shown.stderr.strip()}")
    return json.loads(shown.stdout)


def _exp_ref(root: Path, exp_name: str) -> str:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                          capture_output=True, text=True).stdout.split()
    matches = [r for r in refs if r.endswith("/" + exp_name)]
    if not matches:
        raise RuntimeError(f"DVC experiment {exp_name} not found under refs/exps")
    return matches[-1].removeprefix("refs/exps/")


def _point_failure(name: str, returncode: int, output: str, report_path: Path) -> Exception:
    """The error for a failed ``dvc exp run``: the stage's own user error when it stopped on one, else a crash."""
    tail = output[-3000:]
    report = read_stage_report(report_path)
    if ((report or {}).get("crash") or {}).get("retry") is False:  # a full disk: the point's retry would repeat it
        return stage_failure(report, name, returncode, tail)
    return user_error_from(report, name, returncode, tail) or RuntimeError(f"dvc exp run {name} failed:\n{tail}")


@task(name="sweep-point", task_run_name="{point.method} l={point.labels_per_class} s={point.seed}",
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def run_point(point: SweepPoint, root: str, sweep_id: str, experiment: str) -> dict:
    """One grid point: its MLflow run, then ``dvc exp run --temp`` with the stages nested under it."""
    import tempfile

    from mlflow import MlflowClient

    from ssl_lib.config import apply_overrides, parse_params, read_raw_params
    from tasks.common import STAGE_REPORT_ENV, STAGES
    from tasks.tracking import PARENT_RUN_ENV, close_run, describe_parent_run, open_parent_run

    root_path = Path(root)
    params = parse_params(apply_overrides(read_raw_params(root_path / "params.yaml"), point.overrides))
    name = point.name(sweep_id)
    run_id = open_parent_run(params, invocation=f"sweep-{name}", owner="sweep", run_name=name,
                             extra_tags={"sslpipe.sweep": sweep_id, "dvc.exp_name": name}, experiment=experiment)
    ok, failed_stage = False, None
    try:
        with tempfile.TemporaryDirectory(prefix="sslpipe-point-") as tmp:
            # Each stage leaves its report here; a stage that stops on a user mistake says so in it.
            report_path = Path(tmp) / "report.json"
            env = {PARENT_RUN_ENV: run_id, "MLFLOW_EXPERIMENT_NAME": experiment, "SSLPIPE_ROOT": str(root_path),
                   STAGE_REPORT_ENV: str(report_path)}
            out = subprocess.run(dvc_command(["exp", "run", "--temp", "-n", name, *_dvc_set_args(point.overrides)]),
                                 cwd=root_path, env=subprocess_env(env), capture_output=True, text=True)
            if out.returncode != 0:
                error = _point_failure(name, out.returncode, out.stdout + out.stderr, report_path)
                if isinstance(error, StageUserError) and error.stage in STAGES:  # the stage named its mistake
                    failed_stage = error.stage
                raise error
        metrics = _read_exp_metrics(root_path, name)
        # Before the description, which states them.
        MlflowClient().log_batch(run_id, metrics=_metric_entities(metrics))
        ok = True
    finally:
        # The point's run page says what it is, as a pipeline run's does: result, the point's params, what ran.
        close_run(run_id, ok, lambda: describe_parent_run(
            run_id, params, dvc_experiment=name if ok else None, failed_stage=failed_stage,
            overrides=point.overrides, root=root_path))
    return {"method": point.method, "labels_per_class": point.labels_per_class, "seed": point.seed,
            "ssl_accuracy": metrics["ssl"]["accuracy"], "baseline_accuracy": metrics["baseline"]["accuracy"],
            # the final model's, when the self_train stage ran (self_train.method other than none)
            "self_train_accuracy": metrics.get("self_train", {}).get("accuracy"),
            "ssl_gain": metrics["ssl_gain"], "ssl_knn_accuracy": metrics["ssl"]["knn_accuracy"],
            "pretrained_encoder_knn_accuracy": metrics["pretrained_encoder_knn_accuracy"],
            "dvc_experiment": name, "mlflow_run_id": run_id}


def _metric_entities(metrics: dict) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in headline_metrics(metrics).items()]


def sweep_flow(dask_address: str | None = None):
    """The sweep flow, on a Dask cluster when ``dask_address`` is given ("local" starts a LocalCluster)."""
    if not dask_address:
        return sweep
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        from ssl_lib.config import ConfigError

        raise ConfigError("a Dask address needs prefect-dask: pip install -e '.[dask]'") from None
    runner = DaskTaskRunner() if dask_address == "local" else DaskTaskRunner(address=dask_address)
    return sweep.with_options(task_runner=runner)


def label_efficiency_plot(table: pd.DataFrame, path: Path) -> None:
    """Accuracy against labels per class: SSL and the supervised baseline per method, a band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssl_lib.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    baseline_drawn = set()
    for method, group in table.groupby("method"):
        for column, label, style in (("ssl_accuracy", f"SSL: {method}", "-o"),
                                     ("self_train_accuracy", f"SSL + semi-supervised: {method}", "-^"),
                                     ("baseline_accuracy", "supervised only", "--s")):
            if column == "baseline_accuracy" and tuple(group["labels_per_class"]) in baseline_drawn:
                continue  # the baseline does not depend on the method: draw it once
            if group[column].isna().all():
                continue  # self_train.method none: no such row
            stats = group.groupby("labels_per_class")[column].agg(["mean", "min", "max"])
            line, = ax.plot(stats.index, stats["mean"], style, label=label)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=line.get_color())
            if column == "baseline_accuracy":
                baseline_drawn.add(tuple(group["labels_per_class"]))
    ax.set_xscale("log")
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test accuracy")
    ax.set_title("Label efficiency (band: min-max over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@flow(name="ssl-sweep", log_prints=True)
def sweep(methods: list[str], labels_per_class: list[int], seeds: list[int] = (0,), root: str | None = None,
          workers: int = 1, experiment: str = "ssl-sweep", output_dir: str = "results/sweeps") -> dict:
    """Run the grid; write ``<output_dir>/<sweep id>/{table.csv,label_efficiency.png}``."""
    from ssl_lib.config import ConfigError, apply_overrides, parse_params, read_raw_params
    from tasks.preflight import check_label_budget

    configure_environment()
    logger = get_run_logger()
    root_path = Path(root).resolve() if root else project_root()
    with hold_checkout(root_path):  # one run per checkout (tasks.checkout_lock)
        points = [SweepPoint(m, int(n), int(s)) for m, n, s in itertools.product(methods, labels_per_class, seeds)]
        if not points:
            raise ConfigError("the sweep grid is empty: give at least one method, label budget and seed")
        raw = read_raw_params(root_path / "params.yaml")
        for point in points:  # every point is validated before the first one runs
            check_label_budget(parse_params(apply_overrides(raw, point.overrides), origin=f"sweep point {point}"),
                               root_path)
        if workers > 1 and not os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
            raise ConfigError("parallel sweep points need an MLflow tracking server (SQLite takes one writer): "
                              "start `mlflow server` and set MLFLOW_TRACKING_URI=http://127.0.0.1:5000, "
                              "or use workers=1")
        sweep_id = time.strftime("sweep%Y%m%d-%H%M%S")
        logger.info("sweep %s: %d points, %d worker(s)", sweep_id, len(points), workers)
        rows = []
        for start in range(0, len(points), max(1, workers)):  # at most `workers` DVC temp runs at a time
            futures = [run_point.submit(p, str(root_path), sweep_id, experiment) for p in points[start:start + workers]]
            rows += [f.result() for f in futures]

        # Read by people (table.csv, the Prefect table): 4 decimals; the MLflow runs keep full precision.
        table = pd.DataFrame(rows).sort_values(["method", "labels_per_class", "seed"]).reset_index(drop=True).round(4)
        out_dir = root_path / output_dir / sweep_id
        out_dir.mkdir(parents=True, exist_ok=True)
        from ssl_lib.io import atomic_path

        with atomic_path(out_dir / "table.csv") as tmp:
            table.to_csv(tmp, index=False)
        label_efficiency_plot(table, out_dir / "label_efficiency.png")
        create_table_artifact(key="sweep-results", table=json.loads(table.to_json(orient="records")),
                              description=f"Sweep {sweep_id}: SSL against the supervised baseline")
        logger.info("sweep table: %s", out_dir / "table.csv")
        return {"sweep_id": sweep_id, "table": str(out_dir / "table.csv"),
                "plot": str(out_dir / "label_efficiency.png"), "rows": rows}
