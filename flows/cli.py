"""`sslpipe`: the command line. User mistakes get one clear message and exit code 2, never a traceback.

Only a ``UserError`` (or a stage that stopped on one) counts as a user mistake. Any other exception is a bug
or a transient failure and keeps its traceback, so a bug cannot hide behind a one-line message.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

from tasks.checkout_lock import hold_checkout

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Self-supervised pretraining pipeline: Prefect flows over DVC stages, tracked in MLflow.")

SET_HELP = "Override a param, e.g. --set pretrain.method=rotation (repeatable). Written into params.yaml."
CHECK_SET_HELP = "Override a param for this check only, e.g. --set pretrain.method=rotation (repeatable)."

USER_ERROR_EXIT = 2  # as the stage processes exit on a UserError (tasks.common)
STAGE_CRASH_EXIT = 1


def _fail(message: str, code: int = USER_ERROR_EXIT) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


@contextmanager
def _reported(prefix: str = "") -> Iterator[None]:
    """A user mistake becomes one line and exit 2; everything else that is not a stage's crash propagates.

    A stage that crashed (``StageFailed``) ran in its own process: its traceback is in the DVC output the
    message carries, and one from here would only show the runner, so it is printed as is, with exit 1.
    """
    from flows.stages import StageFailed, StageUserError
    from ssl_lib.errors import UserError

    try:
        yield
    except (UserError, StageUserError) as err:
        _fail(f"{prefix}{err}")
    except StageFailed as err:
        _fail(f"{prefix}{err}", code=STAGE_CRASH_EXIT)


def _parse_sets(sets: list[str] | None) -> dict[str, Any]:
    from ssl_lib.config import parse_override

    return dict(parse_override(item) for item in sets or [])


def _validate(root: Path, overrides: dict[str, Any]):
    """Check params (with overrides) and the label budget before anything starts or is written."""
    from tasks.params_file import params_with_overrides
    from tasks.preflight import check_label_budget

    params = params_with_overrides(root / "params.yaml", overrides,
                                   origin=f"{root / 'params.yaml'}" + (f" with --set {overrides}" if overrides else ""))
    return params, check_label_budget(params, root)


@app.command()
def run(set_: list[str] | None = typer.Option(None, "--set", "-S", help=SET_HELP),
        force: bool = typer.Option(False, help="Rerun every stage even if DVC finds it up to date."),
        no_exp: bool = typer.Option(False, "--no-exp", help="Do not save the run as a DVC experiment."),
        root: Path = typer.Option(Path("."), help="Project root (where dvc.yaml and params.yaml are).")) -> None:
    """Run the whole pipeline as a Prefect flow and print both test accuracies."""
    from tasks.environment import configure_environment
    from tasks.registry import check_same_task, registered_model
    from tasks.tracking import check_store_writable

    root = root.resolve()
    os.environ["SSLPIPE_ROOT"] = str(root)  # anchors the MLflow store at the project, wherever we run from
    configure_environment()
    started = time.perf_counter()
    with ExitStack() as held:
        with _reported():
            # First: a second run in this checkout stops here, before anything reads or writes params.yaml.
            held.enter_context(hold_checkout(root))
            overrides = _parse_sets(set_)
            params, shape = _validate(root, overrides)
            check_store_writable()
            check_same_task(registered_model(params), shape.num_classes,
                            (shape.channels, shape.height, shape.width))
        from flows.pipeline import ssl_pipeline

        with _reported("pipeline failed: "):
            summary = ssl_pipeline(overrides=overrides, root=str(root), force=force, save_experiment=not no_exp)
    _print_summary(summary, params, root, time.perf_counter() - started)


def _print_summary(summary: dict, params, root: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from tasks.run_summary import against_baseline

    m = summary["metrics"]
    table = Table(title=f"ssl-pipeline: {params.pretrain.method} / {params.pretrain.backbone} on {params.data.source}")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("kNN accuracy", justify="right")
    table.add_column("macro F1", justify="right")
    rows = [("baseline", "supervised-only baseline"),
            ("ssl", f"SSL ({params.pretrain.method} + {params.finetune.mode} fine-tune)"),
            ("self_train", f"SSL + semi-supervised ({'+'.join(params.self_train.steps)}, final model)")]
    for kind, label in rows:
        if kind in m:
            table.add_row(label, f"{m[kind]['accuracy']:.4f}", f"{m[kind]['knn_accuracy']:.4f}",
                          f"{m[kind]['macro_f1']:.4f}")
    console = Console()
    console.print(table)
    ran = ", ".join(s["stage"] for s in summary["stages"] if s["executed"]) or "nothing (all up to date)"
    gain = m.get("self_train_gain", m["ssl_gain"])
    planned = summary.get("planned_minutes")
    console.print(f"final model: {against_baseline(gain)}   stages run: {ran}   "
                  f"total {seconds / 60:.1f} min" + (f" (planned {planned:.1f} min)" if planned is not None else ""))
    console.print(f"metrics: {root / 'results/metrics.json'}   DVC experiment: {summary['dvc_experiment']}")
    local = " (start the UI with make ui)" if summary["mlflow_local_ui"] else ""
    console.print(f"MLflow run {summary['mlflow_run_name']!r}: {summary['mlflow_run_url']}{local}", soft_wrap=True)
    console.print(f"all runs: {summary['mlflow_experiment_url']}", soft_wrap=True)


@app.command()
def stage(name: str = typer.Argument(..., help="ingest, pseudo_labels, pretrain, finetune, self_train or evaluate"),
          force: bool = typer.Option(False, help="Rerun even if DVC finds it up to date."),
          root: Path = typer.Option(Path("."), help="Project root.")) -> None:
    """Run one stage through DVC (`dvc repro --single-item NAME`; ingest with the fingerprint stage before it)."""
    from flows.stages import run_dvc_stage
    from tasks.common import STAGES

    if name not in STAGES:
        _fail(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    os.environ["SSLPIPE_ROOT"] = str(root.resolve())
    with _reported(), hold_checkout(root):
        outcome = run_dvc_stage(name, root.resolve(), force=force)
    typer.echo(f"{name}: {'ran' if outcome.executed else 'up to date'} ({outcome.seconds:.1f} s)")


@app.command()
def validate(set_: list[str] | None = typer.Option(None, "--set", "-S", help=CHECK_SET_HELP),
             root: Path = typer.Option(Path("."), help="Project root.")) -> None:
    """Check params.yaml (and overrides) and the label budget, and print the run's plan: the data, the steps of
    each stage and their minutes on this machine (from a few timed steps). Runs no stage and writes nothing."""
    with _reported():
        params, shape = _validate(root.resolve(), _parse_sets(set_))
        from ssl_lib.plan import plan_run

        plan, budget_overrides = plan_run(params, shape)
    typer.echo(params.model_dump_json(indent=2))
    typer.echo(plan.describe())
    if budget_overrides:
        typer.echo("`sslpipe run` would apply: " + " ".join(f"--set {k}={v}" for k, v in budget_overrides.items()))


@app.command()
def predict(source: str = typer.Argument(..., help="A folder of images (or one image), or split:NAME of the "
                                                    "prepared data, e.g. split:test"),
            model: str | None = typer.Option(None, help="MLflow model URI (default: the champion of the data "
                                                         "params.yaml names, models:/<registered model>@champion)."),
            output: Path = typer.Option(Path("predictions.csv"), "--output", "-o", help="CSV to write."),
            flow: bool = typer.Option(False, "--flow", help="Run as a Prefect flow (observable, retried)."),
            root: Path = typer.Option(Path("."), help="Project root (for split:NAME and the MLflow store).")) -> None:
    """Predict classes with a registered model: id, predicted class and class probabilities to a CSV."""
    from tasks.environment import configure_environment

    os.environ["SSLPIPE_ROOT"] = str(root.resolve())
    configure_environment()
    with _reported():
        if model is None:
            from ssl_lib.config import load_params
            from tasks.registry import champion_uri

            model = champion_uri(load_params(root.resolve() / "params.yaml"))
        if flow:
            from flows.predict import predict_flow

            predict_flow(source, model, str(output))
        else:
            from tasks.predict import predict as run_predict

            table = run_predict(source, model, output, prepared_dir=root.resolve() / "data/prepared")
            errors = int((table["status"] == "error").sum())
            typer.echo(f"wrote {len(table) - errors} predictions to {output}"
                       + (f"; {errors} unreadable image(s) listed with status=error" if errors else ""))


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@app.command()
def sweep(methods: str = typer.Option("rotation,simclr", help="Comma-separated methods."),
          labels: str = typer.Option("1,5,10,50,100", help="Comma-separated labels per class."),
          seeds: str = typer.Option("0", help="Comma-separated seeds."),
          workers: int = typer.Option(1, help="Points run at once (>1 needs an MLflow tracking server)."),
          experiment: str = typer.Option("ssl-sweep", help="MLflow experiment of the sweep's runs."),
          dask_address: str | None = typer.Option(None, help="Run points on a Dask cluster: its scheduler "
                                                                "address, or 'local' (needs the dask extra)."),
          root: Path = typer.Option(Path("."), help="Project root.")) -> None:
    """Run a grid of DVC experiments; write a comparison table and a label-efficiency plot."""
    from tasks.environment import configure_environment
    from tasks.tracking import check_store_writable

    os.environ["SSLPIPE_ROOT"] = str(root.resolve())
    configure_environment()
    with _reported(), hold_checkout(root):
        check_store_writable()
        from flows.sweep import sweep_flow

        result = sweep_flow(dask_address)([m.strip() for m in methods.split(",") if m.strip()], _int_list(labels),
                            _int_list(seeds), root=str(root.resolve()), workers=workers, experiment=experiment)
    typer.echo(f"table: {result['table']}\nplot:  {result['plot']}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    sys.exit(main())
