"""What a pipeline run is called and how it is described, in words a runs table and a run page can show.

A run's name says what differs from the project's defaults, the params.yaml of the last commit, so that two
runs tell apart in a truncated runs table: ``simclr 10/class lp_epochs=40 · papaya-pelican`` (method, label
budget, the changed params, then a unique suffix). Its description gives the headline result (rounded), the
changed params, the git commit and what DVC ran or skipped. Text only: the MLflow calls are in tasks.tracking.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from ssl_lib.config import PipelineParams

NAME_SEPARATOR = " · "
MAX_CHANGES_IN_NAME = 3
# Every name starts with the method and the label budget: they are not repeated among the changes.
_IN_NAME_ALREADY = {"pretrain.method", "data.labels_per_class", "data.label_fraction"}


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted keys: ``{"a": {"b": 1}}`` is ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def committed_params(root: Path) -> dict[str, Any] | None:
    """params.yaml as the last commit has it (the defaults a run differs from); None outside git or before it."""
    import yaml

    try:
        out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        raw = yaml.safe_load(out.stdout)
    except yaml.YAMLError:
        return None
    return raw if isinstance(raw, dict) else None


def param_changes(params: PipelineParams, baseline: dict[str, Any] | None,
                  fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dotted params whose value differs from ``baseline`` (raw params, e.g. the committed params.yaml).

    Without a usable baseline (no git, or a committed file this code no longer accepts) the changes are
    ``fallback``, the overrides the run was given, if any.
    """
    from ssl_lib.config import parse_params
    from ssl_lib.errors import UserError

    if baseline is None:
        return dict(fallback or {})
    try:
        before = flatten(parse_params(baseline).model_dump(mode="json"))
    except UserError:
        return dict(fallback or {})
    after = flatten(params.model_dump(mode="json"))
    missing = object()
    return {key: value for key, value in after.items() if before.get(key, missing) != value}


def inherited_note(root: Path, overrides: dict[str, Any]) -> str | None:
    """What a run takes from params.yaml that neither the last commit nor this run's overrides set, in one line,
    with the way back; None when the file is as committed (or outside git).

    ``sslpipe run --set`` writes its overrides into params.yaml (as `dvc exp run -S` does), so a later run starts
    from them: this is said before any compute, not discovered in MLflow afterwards.
    """
    from ssl_lib.config import parse_params, read_raw_params
    from ssl_lib.errors import UserError

    committed = committed_params(root)
    if committed is None:
        return None
    try:
        current = parse_params(read_raw_params(root / "params.yaml"))
    except UserError:
        return None  # the run's own validation says what is wrong
    inherited = {k: v for k, v in param_changes(current, committed).items() if k not in overrides}
    if not inherited:
        return None
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in inherited.items())
    return (f"params.yaml differs from the last commit, and this run keeps it: {shown} (left by an earlier run or "
            "an edit; `git checkout params.yaml` goes back to the committed params)")


def label_budget(params: PipelineParams) -> str:
    """``10/class``, or ``5% labeled`` for a label fraction."""
    if params.data.labels_per_class is not None:
        return f"{params.data.labels_per_class}/class"
    return f"{(params.data.label_fraction or 0) * 100:g}% labeled"


def data_label(params: PipelineParams) -> str:
    """The data in a word or two: the source, and a folder's own name (``folder shapes``)."""
    if params.data.source == "folder" and params.data.path:
        return f"folder {Path(params.data.path).name}"
    return params.data.source


def model_name(trained_from: dict[str, str]) -> str:
    """A logged model's name, saying what it is, from what it was trained from (``tasks.registry.provenance``):
    pretraining method, backbone, data, label budget, then the self-training steps:
    ``simclr-convnet-digits-5-per-class-label_propagation`` (MLflow allows no '/', '.' or '%' in the name)."""
    import re

    budget = trained_from["label_budget"].replace("/class", " per class").replace("% labeled", " pct labeled")
    steps = trained_from.get("self_train", "none")
    parts = [trained_from["method"], trained_from["backbone"], trained_from.get("data", trained_from["data_source"]),
             budget, *([] if steps == "none" else [steps])]
    return re.sub(r"[^A-Za-z0-9_+]+", "-", " ".join(parts)).strip("-")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    return str(value)


def short_key(key: str, keys: set[str]) -> str:
    """The shortest dotted tail of ``key`` that no other key in ``keys`` ends with: ``lp_epochs`` for
    ``finetune.lp_epochs``, but ``pretrain.epochs`` (``epochs`` is also finetune's and self_train's)."""
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        tail = ".".join(parts[-depth:])
        if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
            return tail
    return key


def run_title(params: PipelineParams, changes: dict[str, Any], suffix: str | None = None) -> str:
    """``simclr 10/class lp_epochs=40 · papaya-pelican``: method, label budget, what differs, a unique suffix."""
    keys = set(flatten(params.model_dump(mode="json"))) | set(changes)
    shown = [f"{short_key(k, keys)}={format_value(v)}" for k, v in changes.items() if k not in _IN_NAME_ALREADY]
    if len(shown) > MAX_CHANGES_IN_NAME:
        shown = shown[:MAX_CHANGES_IN_NAME] + [f"+{len(shown) - MAX_CHANGES_IN_NAME} more"]
    title = " ".join([params.pretrain.method, label_budget(params), *shown])
    return f"{title}{NAME_SEPARATOR}{suffix}" if suffix else title


def against_baseline(gain: float) -> str:
    """A gain (a fraction) in words, its sign in the words: ``3.3 points below the supervised-only baseline``
    rather than ``-3.3 points over`` it; within half a tenth of a point, ``level with`` it."""
    points = round(100 * gain, 1)
    if points == 0:
        return "level with the supervised-only baseline"
    return f"{abs(points):.1f} points {'above' if points > 0 else 'below'} the supervised-only baseline"


def headline(params: PipelineParams, metrics: dict[str, float]) -> str:
    """The result in one sentence, rounded: the final model's test accuracy and its gain over the baseline."""
    if "test_accuracy_ssl" not in metrics or "test_accuracy_baseline" not in metrics:
        return "No test result: the evaluate stage did not run."
    baseline = metrics["test_accuracy_baseline"]
    if "test_accuracy_self_train" in metrics:
        final, label = metrics["test_accuracy_self_train"], f"SSL + {'+'.join(params.self_train.steps)}"
        rest = f"; SSL fine-tune alone {metrics['test_accuracy_ssl']:.4f}"
    else:
        final, label, rest = metrics["test_accuracy_ssl"], f"SSL fine-tune ({params.pretrain.method})", ""
    return f"**{label}: test accuracy {final:.4f}**, {against_baseline(final - baseline)} ({baseline:.4f}){rest}."


def plan_against_actual(plan: Any, stage_seconds: dict[str, float | None], total_seconds: float) -> str:
    """``about 9.8 min planned, 10.3 min taken (pretrain 4.1/4.0, ...)``: the plan's estimate next to the run's
    time, per training stage (estimated/actual minutes; a stage DVC skipped shows its few seconds)."""
    head = f"{total_seconds / 60:.1f} min taken"
    if plan.total_seconds is not None:
        head = f"about {plan.total_seconds / 60:.1f} min planned, " + head
    parts = [f"{s.stage} {s.seconds / 60:.1f}/{(stage_seconds.get(s.stage) or 0.0) / 60:.1f}"
             for s in plan.stages if s.seconds is not None and s.stage in stage_seconds]
    return head + (f" (estimated/actual minutes: {', '.join(parts)})" if parts else "")


def describe(params: PipelineParams, metrics: dict[str, float], changes: dict[str, Any], commit: str | None,
             ran: list[str], skipped: list[str], dvc_experiment: str | None = None, model: str | None = None,
             failed_stage: str | None = None, timing: str | None = None, final_choice: str | None = None,
             data: str | None = None) -> str:
    """The run's description (markdown): result, data, changed params, commit, what DVC did, the registered model."""
    lines = [f"**Failed in stage `{failed_stage}`.**" if failed_stage else headline(params, metrics), ""]
    if data:
        lines.append(f"- Data: {data}")
    if changes:
        lines.append("- Changed from the committed params.yaml: "
                     + ", ".join(f"`{k}={format_value(v)}`" for k, v in changes.items()))
    else:
        lines.append("- Params: as committed (params.yaml of the last commit).")
    lines.append(f"- Git commit: `{commit[:12]}`" if commit else "- Git commit: none (not a git repository)")
    dvc = f"- DVC ran {', '.join(ran) or 'no stage'}"
    if skipped and not failed_stage:  # after a failure, the stages not run were not found up to date
        dvc += f"; skipped {', '.join(skipped)} (up to date)"
    lines.append(dvc + (f"; saved as DVC experiment `{dvc_experiment}`" if dvc_experiment else "") + ".")
    if final_choice:
        lines.append(f"- Final model: {final_choice}")
    if model:
        lines.append(f"- Model: {model}")
    if timing:
        lines.append(f"- Time: {timing}")
    return "\n".join(lines)


def headline_metrics(metrics: dict) -> dict[str, float]:
    """results/metrics.json flattened into the metric names runs are compared by in MLflow. The final model's test
    accuracy comes first, as ``test_accuracy``: MLflow's compare view plots the first metric it is given."""
    final = metrics["self_train"] if "self_train" in metrics else metrics["ssl"]
    return {"test_accuracy": final["accuracy"],
            "test_accuracy_ssl": metrics["ssl"]["accuracy"],
            "test_accuracy_baseline": metrics["baseline"]["accuracy"],
            "knn_accuracy_ssl": metrics["ssl"]["knn_accuracy"],
            "knn_accuracy_baseline": metrics["baseline"]["knn_accuracy"],
            "macro_f1_ssl": metrics["ssl"]["macro_f1"], "macro_f1_baseline": metrics["baseline"]["macro_f1"],
            "knn_accuracy_pretrained_encoder": metrics["pretrained_encoder_knn_accuracy"],
            "knn_accuracy_random_encoder": metrics["random_encoder_knn_accuracy"],
            "ssl_gain": metrics["ssl_gain"],
            **({"test_accuracy_self_train": metrics["self_train"]["accuracy"],
                "knn_accuracy_self_train": metrics["self_train"]["knn_accuracy"],
                "macro_f1_self_train": metrics["self_train"]["macro_f1"],
                "self_train_gain": metrics["self_train_gain"]} if "self_train" in metrics else {})}
