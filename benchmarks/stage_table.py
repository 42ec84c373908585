"""Where a pipeline run's time went, stage by stage, and how fast each stage's training steps ran.

By default it runs nothing: it reads the records of the last completed run in a project (``--root``, default this
repository, so after `make run`) and prints one row per stage (ingest, pseudo_labels, pretrain, finetune,
self_train, evaluate) plus the run's start-up and overhead, then a total:

* **wall**: the stage's ``dvc repro`` as the flow timed it (``stages.json`` on the MLflow parent run); for a run
  without it (an older run, or plain ``dvc repro``), the stage's MLflow run plus the gap before it.
* **steps, steps s**: the training steps, and the sum of their times, from the seconds-per-phase columns the
  training loops write into their histories (``ssl_lib.timing``): pretrain's ``history.csv``, finetune's
  ``history_ssl.csv``, ``history_baseline.csv`` and its linear-probe epochs (MLflow metrics ``ssl_lp_*``),
  self_train's ``history.csv``, each read from the stage's MLflow run (on CUDA the loops time the device between
  CUDA events, not the host's kernel launches). A pretraining step is augmentation (batched, inside the method's
  forward), forward, backward, optimizer step and LR schedule, as ``benchmarks/throughput.py`` times it; a
  fine-tuning or self-training step is forward, loss, backward, optimizer and schedule.
* **GFLOP/step, GFLOP/s, % of peak**: one training step of each kind is built in this process exactly as the
  stage builds it from the project's params.yaml and prepared data (``ssl_lib.engine``'s ``build_model`` /
  ``make_engine`` / ``train_step`` for pretraining, ``ssl_lib.classifier.train_classifier`` for fine-tuning and its
  linear probe, ``ssl_lib.self_train``'s step loop for self-training), and counted by ``benchmarks/throughput.py``'s
  ``count_flops`` (torch's FlopCounterMode: matmuls and convolutions, forward and backward); the stage's FLOPs are
  those times its steps of each kind. GFLOP/s is that over the steps' seconds; % of peak is that over the machine's
  peak, measured here by throughput.py's ``measure_peak`` in the steps' precision at the run's thread count. The
  run and the peak are timed at different moments: on a busy machine read them with care.
* **outside steps** (wall - steps), broken down where the records allow: data (batch gathering and augmentation
  outside the step; ingest's whole run), pseudo-targets (pseudo_labels' run; self-training's teacher features, kNN
  graph and label propagation, fixmatch's weak-view labels), EMA, BatchNorm re-estimation, evaluation (the val
  images each epoch; evaluate's whole run), loop (the loss read back, progress, checkpoints), start-up (the stage's
  ``dvc repro`` outside its MLflow run: DVC, the process's start-up, loading params; the run's row: the flow's
  checks and the plan's timed probe before the first stage), and other: the rest (loading data, building models,
  writing outputs, MLflow logging and model registration; the run's row: Prefect, the MLflow parent run and
  `dvc exp save`). The columns add up: steps + outside = wall, and the parts + other = outside.

It prints the table with a header line (machine, date, the command, the run) and notes, and writes the same to
``--out`` (default ``benchmarks/results/stage_table.md``; ``--out ''`` writes nothing).

    .venv/bin/python benchmarks/stage_table.py                                  # the last run, after make run
    .venv/bin/python benchmarks/stage_table.py --root /path/to/project --out /tmp/stage_table.md
    .venv/bin/python benchmarks/stage_table.py --run                            # sslpipe run --force, then the table
    .venv/bin/python benchmarks/stage_table.py --run --device cuda --out benchmarks/results/stage_table-gpu.md

With ``--run`` it first runs ``sslpipe run --force`` in the project (every stage reruns); ``--device cuda`` checks
that CUDA is there before anything and has the run's training stages on the GPU (``--set <stage>.device=cuda``
for a stage whose device param would not pick it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.machine import machine
from ssl_lib.plan import DataShape

REPO = Path(__file__).resolve().parents[1]

# (key, column title) of the parts of a stage's time outside its steps, in the table's order; "other" follows.
PARTS = [("data", "data, aug"), ("targets", "pseudo-targets"), ("ema", "EMA"), ("bn", "BN re-est."),
         ("eval", "evaluation"), ("loop", "loop, checkpoints"), ("startup", "start-up")]
PART_KEYS = [key for key, _ in PARTS]
OVERHEAD = "run start-up, overhead"
TOTAL = "**total**"


@dataclass
class StageRecord:
    """What a run recorded of one stage (seconds), and the FLOPs of its steps (counted here)."""

    stage: str
    wall: float
    executed: bool = True
    steps: int = 0
    step_seconds: float | None = None  # None: the run did not record its steps' time
    parts: dict[str, float] = field(default_factory=dict)  # PART_KEYS -> seconds, outside the steps
    flops: float | None = None  # of all its steps
    precision: str = "fp32"  # of its steps, for the peak they are set against
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the table (no torch, no MLflow)


def table_rows(records: list[StageRecord], peaks: dict[str, float]) -> list[dict[str, Any]]:
    """One row per record, then the total: wall, steps, their seconds and FLOP rates, and the time outside the
    steps split into PARTS and ``other`` (the rest), so that steps + outside = wall and parts + other = outside.
    ``peaks``: FLOP/s per precision."""
    rows = []
    for record in records:
        steps = record.step_seconds or 0.0
        outside = record.wall - steps
        parts = {key: record.parts.get(key) for key in PART_KEYS}  # None: a part this stage has not
        row: dict[str, Any] = {"stage": record.stage if record.executed else f"{record.stage} (up to date)",
                               "wall": record.wall, "steps": record.steps, "step_seconds": record.step_seconds,
                               "outside": outside, **parts, "other": outside - sum(v or 0.0 for v in parts.values())}
        if record.steps and record.flops is not None:
            row["gflop_step"] = record.flops / record.steps / 1e9
            if record.step_seconds:
                row["gflop_s"] = record.flops / record.step_seconds / 1e9
                if record.precision in peaks:
                    row["peak_share"] = record.flops / record.step_seconds / peaks[record.precision]
        rows.append(row)
    total: dict[str, Any] = {"stage": TOTAL}
    for key in ("wall", "steps", "step_seconds", "outside", *PART_KEYS, "other"):
        total[key] = sum(row[key] or 0 for row in rows)
    counted = [r for r in records if r.steps and r.flops is not None and r.step_seconds]
    if counted:
        flops, seconds = sum(r.flops or 0.0 for r in counted), sum(r.step_seconds or 0.0 for r in counted)
        total["gflop_s"] = flops / seconds / 1e9
        if len({r.precision for r in counted}) == 1 and counted[0].precision in peaks:
            total["peak_share"] = flops / seconds / peaks[counted[0].precision]
    return [*rows, total]


COLUMNS = [("stage", "stage", "{}"), ("wall", "wall s", "{:.1f}"), ("steps", "steps", "{:d}"),
           ("step_seconds", "steps s", "{:.1f}"), ("gflop_step", "GFLOP/step", "{:.2f}"),
           ("gflop_s", "GFLOP/s", "{:.1f}"), ("peak_share", "% of peak", "{:.1%}"),
           ("outside", "outside steps s", "{:.1f}"), *[(key, title, "{:.1f}") for key, title in PARTS],
           ("other", "other", "{:.1f}")]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a" if key == "step_seconds" and row.get("steps") else ""
    if key == "steps" and not value:
        return ""
    if isinstance(value, float) and abs(value) < 0.005:
        value = 0.0  # not "-0.0" for a difference that is zero but for rounding
    return fmt.format(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run's records (MLflow)


def _seconds(run: Any) -> float:
    return (run.info.end_time - run.info.start_time) / 1000.0


def _sum(frame: Any, column: str) -> float:
    return float(frame[column].sum()) if frame is not None and column in frame.columns else 0.0


def _has(frame: Any, column: str) -> bool:
    return frame is not None and column in frame.columns and not frame[column].isna().any()


def _metric_sum(client: Any, run_id: str, key: str) -> float:
    return float(sum(m.value for m in client.get_metric_history(run_id, key)))


def _csv_artifact(client: Any, run_id: str, name: str, tmp: Path) -> Any:
    import pandas as pd

    if name not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    path = client.download_artifacts(run_id, name, str(tmp / run_id))
    return pd.read_csv(path) if Path(path).stat().st_size else None


def _json_artifact(client: Any, run_id: str, name: str, tmp: Path) -> Any:
    if name not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    return json.loads(Path(client.download_artifacts(run_id, name, str(tmp / run_id))).read_text())


def find_parent_run(client: Any, experiment_id: str, run_id: str | None) -> Any:
    """The parent run ``run_id``, or the last finished pipeline run of the experiment."""
    from tasks.tracking import INVOCATION_TAG

    if run_id:
        return client.get_run(run_id)
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    parents = [r for r in runs if INVOCATION_TAG in r.data.tags and "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise SystemExit("stage_table: no finished pipeline run in this project's MLflow store; run `make run` "
                         "(or pass --run)")
    return parents[0]


def stage_parts(stage: str, client: Any, run: Any, tmp: Path) -> tuple[float | None, dict[str, float], list[str]]:
    """A stage's steps' seconds (None where its run did not record them) and the parts of its time outside them
    that its records give, from its MLflow run (histories, metrics)."""
    run_id, span = run.info.run_id, _seconds(run)
    if stage == "ingest":
        return None, {"data": span}, []
    if stage == "pseudo_labels":
        return None, {"targets": span}, []
    if stage == "evaluate":
        return None, {"eval": span}, []
    old = ["its run was recorded before the training loops timed their steps (ssl_lib.timing): no steps s"]
    if stage == "pretrain":
        history = _csv_artifact(client, run_id, "history.csv", tmp)
        if not _has(history, "step_seconds"):
            return None, {}, old
        notes = []
        per_epoch = history["step_seconds"]
        if len(per_epoch) >= 3:  # the first epoch's extra: torch.compile's compilation (CUDA), warm-up
            extra = float(per_epoch.iloc[0] - per_epoch.iloc[1:].median())
            if extra > 0.05 * float(per_epoch.sum()):
                notes.append(f"its first epoch's steps took {extra:.1f} s more than the median of the others "
                             "(compilation, warm-up); steps s includes them")
        return _sum(history, "step_seconds"), {"data": _sum(history, "data_seconds"), "loop": _sum(
            history, "checkpoint_seconds") + _sum(history, "bookkeeping_seconds")}, notes
    if stage == "finetune":
        frames = [_csv_artifact(client, run_id, f"history_{kind}.csv", tmp) for kind in ("ssl", "baseline")]
        if not all(_has(frame, "step_seconds") for frame in frames):
            return None, {}, old
        lp = {phase: sum(_metric_sum(client, run_id, f"{kind}_lp_{phase}_seconds") for kind in ("ssl", "baseline"))
              for phase in ("data", "step", "eval", "other")}
        step = sum(_sum(frame, "step_seconds") for frame in frames) + lp["step"]
        parts = {part: sum(_sum(frame, f"{phase}_seconds") for frame in frames) + lp[phase]
                 for part, phase in (("data", "data"), ("eval", "eval"), ("loop", "other"))}
        return step, parts, []
    if stage == "self_train":
        history = _csv_artifact(client, run_id, "history.csv", tmp)
        if history is None or history.empty:
            return 0.0, {}, []  # self_train.method none: no step
        if not _has(history, "step_seconds"):
            return None, {}, old
        metrics = {m for m in run.data.metrics if m.endswith(("_targets_seconds", "_features_seconds",
                                                                "_graph_seconds"))}
        rounds = {key: _metric_sum(client, run_id, key) for key in metrics}
        targets = sum(v for k, v in rounds.items() if k.endswith("_targets_seconds"))
        features = sum(v for k, v in rounds.items() if k.endswith("_features_seconds"))
        graph = sum(v for k, v in rounds.items() if k.endswith("_graph_seconds"))
        teacher = _sum(history, "teacher_seconds")
        parts = {"data": _sum(history, "data_seconds"), "targets": targets + teacher,
                 "ema": _sum(history, "ema_seconds"), "bn": _sum(history, "bn_recalibration_seconds"),
                 "eval": _sum(history, "eval_seconds"), "loop": _sum(history, "other_seconds")}
        note = (f"pseudo-targets: the teacher's features over the pool {features:.1f} s, whitening, kNN "
                f"graph and propagation {graph:.1f} s, the rest of the targets (val check) "
                f"{targets - features - graph:.1f} s, fixmatch's weak-view labels {teacher:.1f} s")
        return _sum(history, "step_seconds"), parts, [note]
    raise ValueError(f"unknown stage {stage!r}")


@dataclass
class RunRecords:
    parent: Any
    records: list[StageRecord]
    plan: dict[str, Any] | None
    threads: int | None  # torch's thread count in the stage processes
    devices: dict[str, str]  # stage -> the device tag its run set, where it set one
    notes: list[str]


def load_records(root: Path, run_id: str | None = None) -> RunRecords:
    """The records of run ``run_id`` (default: the last finished one) in the MLflow store of the project ``root``."""
    from mlflow import MlflowClient

    from tasks.common import STAGES

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from tasks.tracking import STAGE_TIMES_FILE, THREADS_TAG, experiment_name

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None:
        raise SystemExit(f"stage_table: no experiment {experiment_name()!r} in {os.environ['MLFLOW_TRACKING_URI']}; "
                         "run `make run` first (or pass --run)")
    parent = find_parent_run(client, experiment.experiment_id, run_id)
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    runs = {}
    for child in children:  # a retried stage: its last finished run
        if child.info.status == "FINISHED":
            runs[child.data.tags.get("sslpipe.stage")] = child
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        plan = _json_artifact(client, parent.info.run_id, "plan.json", tmp)
        times = _json_artifact(client, parent.info.run_id, STAGE_TIMES_FILE, tmp)
        outcomes = {row["stage"]: row for row in (times or {}).get("stages", [])}
        records = []
        previous_end = parent.info.start_time
        for stage in STAGES:
            run = runs.get(stage)
            outcome = outcomes.get(stage)
            if run is None:
                if outcome is not None:  # DVC found it up to date
                    records.append(StageRecord(stage, outcome["seconds"], executed=False,
                                               parts={"startup": outcome["seconds"]}))
                continue
            span = _seconds(run)
            if outcome is not None:
                wall = outcome["seconds"]
            else:  # no flow record: the stage's MLflow run and the gap before it (the previous stage's end, DVC)
                wall = span + (run.info.start_time - previous_end) / 1000.0
            previous_end = run.info.end_time
            step, parts, stage_notes = stage_parts(stage, client, run, tmp)
            parts["startup"] = wall - span
            records.append(StageRecord(stage, wall, step_seconds=step, parts=parts, notes=stage_notes))
    run_wall = times["flow_seconds"] if times else _seconds(parent)
    overhead = run_wall - sum(r.wall for r in records)
    records.append(StageRecord(OVERHEAD, overhead, parts={"startup": times["before_stages_seconds"]} if times else {}))
    if times is not None:
        notes.append("run start-up, overhead: the flow's wall time outside the stages; start-up is the flow's work "
                     "before the first stage (params, checks, the plan's timed probe), other is Prefect, the MLflow "
                     "parent run and `dvc exp save`. `sslpipe run`'s own start (imports, Prefect's temporary server) "
                     "comes before the flow and is in no record")
    if "ingest" in outcomes:
        notes.append("ingest's start-up includes the fingerprint stage DVC runs before it")
    if times is None:
        notes.append("no stages.json on the run (a run before the flow recorded it, or plain `dvc repro`): each "
                     "stage's wall is its MLflow run plus the gap before it, the run's is its MLflow parent run")
    threads = {int(run.data.tags[THREADS_TAG]) for run in runs.values() if THREADS_TAG in run.data.tags}
    devices = {stage: run.data.tags["device"] for stage, run in runs.items() if "device" in run.data.tags}
    return RunRecords(parent, records, plan, threads.pop() if len(threads) == 1 else None, devices, notes)


# --------------------------------------------------------------------------- FLOPs of the stages' steps


@dataclass(frozen=True)
class DataInfo(DataShape):
    """The prepared data's shape and pool sizes (``ssl_lib.plan.DataShape``), with its normalisation."""

    mean: list[float]
    std: list[float]


def data_info(root: Path) -> DataInfo:
    """The prepared data's shape and pool sizes, as the stages see them."""
    from ssl_lib.data.prepared import load_prepared

    data = load_prepared(root / "data" / "prepared")
    height, width, channels = (int(d) for d in data.meta["shape"])
    shape = DataShape.from_splits(data.manifest["split"].to_numpy(), len(data.class_names), height, width, channels)
    return DataInfo(**asdict(shape), mean=list(data.meta["mean"]), std=list(data.meta["std"]))


def _random_images(count: int, data: DataInfo, device: Any) -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (count, data.channels, data.height, data.width)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(device)


def pretrain_flops(params: Any, data: DataInfo) -> tuple[float, int, str]:
    """(FLOPs of all pretraining steps, steps, precision): one step built as ``ssl_lib.pretrain`` builds it."""
    import torch

    from benchmarks.throughput import count_flops
    from ssl_lib.acceleration import resolve_acceleration
    from ssl_lib.device import select_device
    from ssl_lib.engine import build_model, make_engine, train_step
    from ssl_lib.methods import get_method
    from ssl_lib.plan import make_plan
    from ssl_lib.pretrain_plan import PretrainSettings

    s = PretrainSettings.from_params(params, data.pretrain_pool)
    device = select_device(s.device)
    # Compiled or not, the same FLOPs (FlopCounterMode runs a compiled model eagerly): not compiled here.
    accel = replace(resolve_acceleration(device, s.precision, s.channels_last, s.compile), compile=False)
    model, _, _ = build_model(s.method, s.backbone, s.options, data.mean, data.std, data.channels, data.height,
                              s.seed, device, accel)
    model.train()
    engine = make_engine(model, accel, device, 10, s.optimizer, s.lr, s.weight_decay, s.warmup_fraction)
    pseudo = get_method(s.method).make_pseudo_labels(s.batch_size, 1, s.seed)
    targets = {k: torch.as_tensor(v[0]).to(device) for k, v in pseudo.items() if k != "epoch_seed"}
    images = _random_images(s.batch_size, data, device).float().div_(255.0)
    generator = torch.Generator().manual_seed(0)
    flops = count_flops(lambda: train_step(engine, images, targets, generator, 0))
    steps = make_plan(params, data).stage("pretrain").steps  # the steps the stage takes, by the stage's rules
    return float(flops) * steps, steps, accel.precision


def finetune_flops(params: Any, data: DataInfo) -> tuple[float, int]:
    """(FLOPs of all fine-tuning steps, steps): the SSL model's linear-probe and full epochs and the baseline's,
    each step counted through ``train_classifier`` as the stage runs it (the ragged last batch counted apart)."""
    import numpy as np

    from benchmarks.throughput import count_flops
    from ssl_lib.classifier import FinetuneSettings, build_classifier, train_classifier

    def one_step(settings: Any, batch: int, lp: bool) -> int:
        spec = dict(backbone=params.pretrain.backbone, in_channels=data.channels, image_size=data.height,
                    num_classes=data.num_classes, mean=data.mean, std=data.std)
        images = _random_images(batch, data, "cpu").permute(0, 2, 3, 1).numpy()
        labels = np.arange(batch) % data.num_classes

        def run(lp_epochs: int) -> int:
            step_settings = replace(settings, epochs=1, batch_size=batch, lp_epochs=lp_epochs, head_init="random")
            return count_flops(lambda: train_classifier(build_classifier(**spec, seed=params.seed), images, labels,
                                                        None, None, step_settings, progress=False))

        full = run(0)
        return run(1) - full if lp else full

    total, steps = 0.0, 0
    for baseline in (False, True):
        settings = FinetuneSettings.from_params(params, data.height, baseline=baseline)
        batch = min(settings.batch_size, data.labeled)
        sizes = [batch] * (data.labeled // batch) + ([data.labeled % batch] if data.labeled % batch else [])
        trained = [b for b in sizes if b >= 2 or settings.mode == "linear"]  # a 1-image batch is skipped in full
        for lp, epochs, batches in ((True, settings.lp_epochs, sizes), (False, settings.epochs, trained)):
            if epochs:
                total += epochs * sum(one_step(settings, b, lp) for b in batches)
                steps += epochs * len(batches)
    return total, steps


def self_train_flops(params: Any, data: DataInfo) -> tuple[float, int]:
    """(FLOPs of all self-training steps, steps): one step of each method, run by ``ssl_lib.self_train``'s own step
    loop on a pool of one batch (no BatchNorm re-estimation, no val images: only the step is counted)."""
    import torch

    from benchmarks.throughput import count_flops
    from ssl_lib.classifier import build_classifier
    from ssl_lib.device import select_device
    from ssl_lib.self_train import SelfTrainSettings, _train_step_method
    from ssl_lib.sizing import self_train_steps

    settings = SelfTrainSettings.from_params(params, data.self_train_pool, data.num_classes, data.height)
    if not settings.steps or not settings.rounds:
        return 0.0, 0
    device = select_device(settings.device)
    per_method = self_train_steps(settings.epochs, data.self_train_pool, settings.batch_size)
    one = replace(settings, epochs=1.0, bn_recalibration=0)  # a pool of one batch: one step
    pool = _random_images(settings.batch_size, data, device)
    labeled_x = _random_images(settings.labeled_batch_size, data, device)
    labeled_y = torch.arange(settings.labeled_batch_size, device=device) % data.num_classes
    no_val = (pool[:0], labeled_y[:0])  # no val images: the epoch's val accuracy measures nothing
    total = 0.0
    for method in settings.steps:
        model = build_classifier(params.pretrain.backbone, data.channels, data.height, data.num_classes, data.mean,
                                 data.std).to(device).to(memory_format=torch.channels_last)
        static = None if method == "fixmatch" else (
            torch.nn.functional.one_hot(torch.arange(len(pool)) % data.num_classes, data.num_classes).float(),
            torch.ones(len(pool)))
        flops = count_flops(lambda m=method, net=model, st=static: _train_step_method(
            m, net, pool, labeled_x, labeled_y, st, one, torch.Generator().manual_seed(0), {"round": 1, "method": m},
            no_val, None, False))
        total += float(flops) * per_method * settings.rounds
    return total, per_method * settings.rounds * len(settings.steps)


def count_stage_flops(records: list[StageRecord], params: Any, data: DataInfo,
                      log: Any) -> dict[str, tuple[Any, str]]:
    """Fill in each training stage's FLOPs and steps; returns {precision: (device, dtype name)} of the steps."""
    import torch

    from ssl_lib.device import select_device

    by_stage = {r.stage: r for r in records}
    precisions: dict[str, tuple[Any, str]] = {}
    with torch.random.fork_rng(devices=[]):
        if "pretrain" in by_stage:
            flops, steps, precision = pretrain_flops(params, data)
            by_stage["pretrain"].flops, by_stage["pretrain"].steps = flops, steps
            by_stage["pretrain"].precision = precision
            precisions[precision] = (select_device(params.pretrain.device), precision)
            log(f"pretrain: {steps} steps, {flops / max(steps, 1) / 1e9:.2f} GFLOP/step")
        if "finetune" in by_stage:
            flops, steps = finetune_flops(params, data)
            by_stage["finetune"].flops, by_stage["finetune"].steps = flops, steps
            precisions.setdefault("fp32", (select_device(params.finetune.device), "fp32"))
            log(f"finetune: {steps} steps, {flops / max(steps, 1) / 1e9:.3f} GFLOP/step on average")
        if "self_train" in by_stage:
            flops, steps = self_train_flops(params, data)
            by_stage["self_train"].flops, by_stage["self_train"].steps = flops, steps
            if steps:
                precisions.setdefault("fp32", (select_device(params.self_train.device), "fp32"))
            log(f"self_train: {steps} steps, {flops / max(steps, 1) / 1e9:.2f} GFLOP/step")
    return precisions


def measure_peaks(precisions: dict[str, tuple[Any, str]], quick: bool, reps: int,
                  log: Any) -> tuple[dict[str, float], list[str]]:
    """The machine's peak FLOP/s in each precision the steps ran in (throughput.py's measurement)."""
    import torch

    from benchmarks.throughput import PEAK_CONV, PEAK_SIZE, QUICK_PEAK_CONV, measure_peak

    peaks, notes = {}, []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for precision, (device, _) in sorted(precisions.items()):
        size = 1024 if quick else PEAK_SIZE.get(device.type, PEAK_SIZE["cpu"])
        conv = QUICK_PEAK_CONV if quick else PEAK_CONV.get(device.type, PEAK_CONV["cpu"])
        peak = measure_peak(device, dtypes[precision], size, conv, reps, log)
        peaks[precision] = max(peak.values())
        batch, channels, side = conv
        notes.append(f"{precision} peak on {device}: {peaks[precision] / 1e9:.1f} GFLOP/s, the faster of a "
                     f"{size}x{size} matmul ({peak['matmul'] / 1e9:.1f}) and a 3x3 convolution ({channels} channels, "
                     f"{side}x{side}, batch {batch}, channels_last: {peak['conv'] / 1e9:.1f}), median of {reps}")
    return peaks, notes


# --------------------------------------------------------------------------- header, run, main


def check_params(parent: Any, params: Any) -> list[str]:
    """Params that differ between params.yaml (what the FLOPs are counted from) and the run's logged params."""
    from tasks.run_summary import flatten

    logged = parent.data.params
    current = {k: "null" if v is None else str(v) for k, v in flatten(params.model_dump(mode="json")).items()}
    return sorted(k for k, v in current.items() if k in logged and logged[k] != v)


def run_pipeline(root: Path, device: str | None, params: Any) -> list[str]:
    """``sslpipe run --force`` in ``root`` (every stage reruns), its training stages on ``device`` if given;
    returns the command."""
    from ssl_lib.device import select_device

    sets = []
    if device:
        for section in ("pretrain", "finetune", "self_train"):
            if select_device(getattr(params, section).device).type != select_device(device).type:
                sets += ["--set", f"{section}.device={device}"]
    command = [sys.executable, "-m", "flows.cli", "run", "--force", "--root", str(root), *sets]
    print("running: sslpipe " + shlex.join(command[3:]), file=sys.stderr, flush=True)
    code = subprocess.call(command, cwd=REPO)
    if code:
        raise SystemExit(f"stage_table: the pipeline run failed (exit {code})")
    return command[3:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO), help="the project whose last run is read (default: this one)")
    parser.add_argument("--run-id", default=None, help="an MLflow parent run id (default: the last finished run)")
    parser.add_argument("--run", action="store_true", help="first run the pipeline: sslpipe run --force")
    parser.add_argument("--device", default=None,
                        help="with --run: the training stages' device, e.g. cuda (checked first)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the peak (default: the stage runs' recorded count)")
    parser.add_argument("--peak-reps", type=int, default=3, help="timed matmuls and convolutions for the peak")
    parser.add_argument("--quick-peak", action="store_true", help="a small matmul and convolution (smoke runs)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stage_table.md"),
                        help="write the table (markdown) here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    import torch

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"stage_table: --device {args.device}, but CUDA is not available here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); run it on a CUDA machine")
    root = Path(args.root).resolve()
    os.environ["SSLPIPE_ROOT"] = str(root)
    from ssl_lib.config import load_params
    from ssl_lib.device import select_device
    from tasks.environment import configure_environment

    configure_environment()
    params = load_params(root / "params.yaml")
    ran = run_pipeline(root, args.device, params) if args.run else None
    if ran:
        params = load_params(root / "params.yaml")  # with what the run wrote into it
    found = load_records(root, args.run_id)
    threads = args.threads or found.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    notes = list(found.notes)
    if found.threads is None:
        notes.append("the stage runs recorded no torch thread count (sslpipe.torch_threads): the peak is measured "
                     f"at {threads}")
    elif found.threads != threads:
        notes.append(f"the stages ran with {found.threads} torch threads, the peak is measured at {threads}")
    differ = check_params(found.parent, params)
    if differ:
        notes.append(f"params.yaml differs from the run's params in {', '.join(differ)}: the FLOPs are counted from "
                     "params.yaml")
    data = data_info(root)
    precisions = count_stage_flops(found.records, params, data, log)
    peaks, peak_notes = measure_peaks(precisions, args.quick_peak, args.peak_reps, log)
    if found.plan:
        planned = {row["stage"]: row["steps"] for row in found.plan.get("stages", [])}
        for record in found.records:
            if record.stage in planned and record.steps != planned[record.stage]:
                notes.append(f"{record.stage}: {record.steps} steps counted here, {planned[record.stage]} in the "
                             "run's plan.json")
    rows = table_rows(found.records, peaks)
    parent = found.parent
    started = datetime.fromtimestamp(parent.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/stage_table.py", *(sys.argv[1:] if argv is None else argv)])
    devices = ", ".join(f"{stage} on {device}" for stage, device in found.devices.items())
    devices += (", " if devices else "") + ", ".join(
        f"{section} on {select_device(getattr(params, section).device)}" for section in ("finetune", "self_train"))
    plural = "s" if threads != 1 else ""
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, torch {torch.__version__}, {threads} torch "
              f"thread{plural}: `{command}`" + (f" (which ran `sslpipe {shlex.join(ran)}` first)" if ran else "")
              + f". Run `{parent.info.run_name}` ({parent.info.run_id[:12]}), started {started}, in {root}; "
              f"{devices} (finetune's and self_train's device: their params, resolved on this machine).")
    stage_notes = [f"{record.stage}: {note}" for record in found.records for note in record.notes]
    lines = [f"- {note}" for note in [*peak_notes, *notes, *stage_notes]]
    explain = ("Seconds. wall = steps s + outside steps s; outside steps = data, aug + pseudo-targets + EMA + "
               "BN re-est. + evaluation + loop, checkpoints + start-up + other (what the records do not split: "
               "loading data, building models, writing outputs, MLflow). GFLOP/step: one training step's forward "
               "and backward as FlopCounterMode counts them (finetune: the mean of its linear-probe and full steps); "
               "GFLOP/s: the steps' FLOPs over their seconds; % of peak: that over the peak below. Each column is "
               "described in benchmarks/stage_table.py's docstring.")
    text = "\n\n".join([header, markdown_table(rows), explain, "\n".join(lines)]).rstrip() + "\n"
    print(text)
    if args.out:
        from ssl_lib.io import atomic_path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(text)
        log(f"written to {args.out}")


if __name__ == "__main__":
    main()
