"""MLflow glue: one parent run per pipeline execution, one nested run per stage.

A pipeline execution is either a Prefect flow run (the flow opens the parent run and hands its id
to the stages through ``$SSLPIPE_PARENT_RUN_ID``) or one ``dvc repro`` / ``dvc exp run`` process
(the first stage it runs opens the parent, tagged with that DVC process's identity, and later
stages of the same process find it). Run ids cross process boundaries explicitly because MLflow's
active run is per thread. A parent run is named and described by tasks.run_summary: what differs from the
committed params, and its result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_lib.config import PipelineParams
from ssl_lib.errors import UserError
from tasks import paths
from tasks.common import STAGES
from tasks.dataset_digest import dataset_hash
from tasks.environment import configure_environment, project_root
from tasks.run_summary import committed_params, data_label, describe, flatten, param_changes, run_title

if TYPE_CHECKING:
    from ssl_lib.plan import RunPlan

PARENT_RUN_ENV = "SSLPIPE_PARENT_RUN_ID"
PREFECT_RUN_ENV = "SSLPIPE_PREFECT_FLOW_RUN_ID"
DEFAULT_EXPERIMENT = "ssl-pipeline"
INVOCATION_TAG = "sslpipe.invocation"
OWNER_TAG = "sslpipe.parent_owner"
# The stages that read the prepared data, and what for (the dataset's context in MLflow); ingest writes it.
DATA_CONTEXT = {"pseudo_labels": "training", "pretrain": "training", "finetune": "training",
                "self_train": "training", "evaluate": "evaluation"}
# MLflow 3's UI may open an experiment in the view its kind names (3.17 does not: see MODEL_TRAINING_VIEW).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # what the run page shows as the run's description
MODEL_TAG = "sslpipe.model"  # on a parent run: the registered version and its champion decision, in words
FINAL_CHOICE_TAG = "sslpipe.final_model"  # on a parent run: which candidate became the final model, and why
LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` (mlflow ui) serves a local store
# On every run this code opens: the process that keeps it RUNNING, so that a later start can tell one whose process
# was killed (it stays RUNNING forever otherwise) from one still in progress.
PID_TAG = "sslpipe.pid"
HOST_TAG = "sslpipe.host"


class StoreNotWritable(UserError):
    """The MLflow store is a local SQLite file this process cannot write; the message names it and the fix."""


def check_store_writable() -> None:
    """Raise StoreNotWritable when the tracking store is a local SQLite file that cannot be written.

    Checked before a run starts and by each stage before its first MLflow call: MLflow would otherwise fail at
    its first write, with a traceback from every stage and retry. A server (or any other store) reports its own
    errors.
    """
    configure_environment()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    folder = path.parent
    if not folder.is_dir():
        problem = f"its folder {folder} does not exist"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = "the file is read-only"
    elif not os.access(folder, os.W_OK):  # SQLite writes its journal beside the database
        problem = f"its folder {folder} is read-only"
    else:
        return
    raise StoreNotWritable(f"the MLflow store {path} cannot be written ({problem}): make it writable (e.g. "
                           f"chmod u+w {path} {folder}), or point MLFLOW_TRACKING_URI at a store you can write")
# MLflow 3.17's UI shows an experiment in the view its sidebar switch last chose (GenAI by default) and ignores the
# experiment's kind tag; a link with this query opens the model-training view (runs, metrics, the model registry).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def experiment_id(name: str | None = None) -> str:
    """The id of experiment ``name`` (default: $MLFLOW_EXPERIMENT_NAME or ssl-pipeline), created if missing.

    It is made to open in MLflow's model-training view: tagged so on creation, and an experiment of ours without
    the tag (made by an earlier version) gets it. A kind someone chose in the UI is left alone.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_store_writable()  # configures the environment too
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    name = name or experiment_name()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # Anchor artifacts at the project root too: MLflow's default (./mlruns under the cwd) would land
        # inside DVC's temp workspaces and vanish with them.
        artifacts = (project_root() / "mlartifacts").as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=artifacts,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException:
            experiment = mlflow.get_experiment_by_name(name)  # created meanwhile by a concurrent stage
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def owner_tags() -> dict[str, str]:
    """Which process keeps a run RUNNING (``end_dead_runs``)."""
    import socket

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def end_dead_runs(exp_id: str) -> list[str]:
    """End as KILLED the runs of experiment ``exp_id`` left RUNNING by a process of this machine that is gone (a
    SIGKILL, a power cut), and mark the model versions they registered and never evaluated; return their ids.

    Runs of other machines, runs without an owner, and runs whose process still runs (another sweep point, a run
    in another checkout) are left alone.
    """
    from mlflow import MlflowClient

    from ssl_lib.io import process_alive
    from tasks.registry import abandon_versions_of

    client = MlflowClient()
    host = owner_tags()[HOST_TAG]
    ended = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        pid = run.data.tags.get(PID_TAG, "")
        if run.data.tags.get(HOST_TAG) != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        abandon_versions_of(run.info.run_id)
        ended.append(run.info.run_id)
    if ended:
        logging.getLogger("sslpipe").warning("ended %d MLflow run(s) whose process was killed as KILLED: %s",
                                             len(ended), ", ".join(ended))
    return ended


def ui_base() -> tuple[str, bool]:
    """The MLflow UI's address, and whether it is the local UI's (a sqlite or file store, shown by `make ui`)
    rather than the tracking server's own."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    local = not uri.startswith(("http://", "https://"))
    return (LOCAL_UI if local else uri.rstrip("/")), local


def experiment_url(experiment: str) -> str:
    """The runs table of an experiment, in MLflow's model-training view (``MODEL_TRAINING_VIEW``)."""
    return f"{ui_base()[0]}/#/experiments/{experiment}?{MODEL_TRAINING_VIEW}"


def run_url(run_id: str, experiment: str) -> tuple[str, bool]:
    """The MLflow UI's page of a run, in the model-training view, and whether it is the local UI's."""
    base, local = ui_base()
    return f"{base}/#/experiments/{experiment}/runs/{run_id}?{MODEL_TRAINING_VIEW}", local


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def common_tags(params: PipelineParams) -> dict[str, str]:
    tags = {
        "sslpipe.method": params.pretrain.method,
        "sslpipe.backbone": params.pretrain.backbone,
        "sslpipe.data_source": params.data.source,
    }
    optional = {
        "mlflow.source.git.commit": git_commit(),
        "sslpipe.dataset_hash": dataset_hash(),
        "prefect.flow_run_id": os.environ.get(PREFECT_RUN_ENV),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
    }
    tags.update({k: v for k, v in optional.items() if v})
    return tags


def _dvc_invocation_key() -> str | None:
    """Identify the enclosing ``dvc`` process, so that all stages it runs share one parent run."""
    import psutil

    try:
        for proc in psutil.Process().parents():
            cmdline = proc.cmdline()
            head = [Path(arg).name for arg in cmdline[:3]]
            if "dvc" in head or ("-m" in head and "dvc" in cmdline[:4]):
                return f"dvc-{proc.pid}-{int(proc.create_time() * 1000)}"
    except (psutil.Error, OSError):
        return None
    return None


def open_parent_run(params: PipelineParams, invocation: str, owner: str, run_name: str | None = None,
                    extra_tags: dict[str, str] | None = None, experiment: str | None = None) -> str:
    """Find the parent run of ``invocation`` or create it (with all params logged); return its id."""
    from mlflow import MlflowClient

    exp_id = experiment_id(experiment)
    end_dead_runs(exp_id)
    client = MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in owner_tags().items():  # this process keeps it running now
            client.set_tag(run_id, key, value)
        return run_id
    # A `dvc exp run` names its experiment; a plain `dvc repro` gets the time, to tell its runs apart.
    suffix = os.environ.get("DVC_EXP_NAME") or time.strftime("%Y-%m-%d %H:%M:%S")
    name = run_name or run_title(params, param_changes(params, committed_params(project_root())), suffix)
    tags = {**common_tags(params), **(extra_tags or {}), INVOCATION_TAG: invocation, OWNER_TAG: owner,
            "mlflow.runName": name, **owner_tags()}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    flat = flatten(params.model_dump(mode="json"))
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in flat.items()])
    return run.info.run_id


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, "null" if value is None else str(value))


def finish_run(run_id: str, succeeded: bool) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status="FINISHED" if succeeded else "FAILED")


def close_run(run_id: str, succeeded: bool, write_description: Callable[[], object]) -> None:
    """Describe a parent run (``write_description``), then mark it finished or failed.

    Called from a ``finally``: when the run has failed already, its own error is the one to report (it says what
    went wrong, and its kind decides a retry), so a failure to describe the run is logged, not raised; the run
    is marked failed either way. A run that succeeded but cannot be described raises.
    """
    try:
        write_description()
    except Exception:
        if succeeded:
            finish_run(run_id, False)
            raise
        logging.getLogger("sslpipe").warning("could not describe the failed run %s", run_id, exc_info=True)
    finish_run(run_id, succeeded)


def describe_parent_run(run_id: str, params: PipelineParams, ran: list[str] | None = None,
                        skipped: list[str] | None = None, dvc_experiment: str | None = None,
                        failed_stage: str | None = None, overrides: dict[str, Any] | None = None,
                        root: Path | None = None, timing: str | None = None) -> str:
    """Write the parent run's description from what it holds (metrics, commit, model) and what DVC did.

    ``ran``/``skipped`` are the stages DVC ran and found up to date; without them (a `dvc repro` parent) the
    stages with a nested run ran, and the rest were up to date. ``overrides`` name the changes when the
    committed params.yaml cannot be read; ``root`` is the project (default: ``project_root()``). Returns the text.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    if ran is None:
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        executed = {child.data.tags.get("sslpipe.stage") for child in children}
        ran = [stage for stage in STAGES if stage in executed]
        skipped = [stage for stage in STAGES if stage not in executed]
    changes = param_changes(params, committed_params(root or project_root()), overrides)
    text = describe(params, run.data.metrics, changes, run.data.tags.get("mlflow.source.git.commit"), ran,
                    skipped or [], dvc_experiment=dvc_experiment, model=run.data.tags.get(MODEL_TAG),
                    failed_stage=failed_stage, timing=timing, final_choice=run.data.tags.get(FINAL_CHOICE_TAG),
                    data=data_summary(dataset_entity(params, root)))
    client.set_tag(run_id, DESCRIPTION_TAG, text)
    return text


def log_plan(run_id: str, plan: RunPlan) -> None:
    """The run's plan on its parent run, before any compute: plan.json (data, steps and estimated minutes per
    stage). Its estimated total is a metric too, logged when the run is described (``log_planned_minutes``)."""
    import json
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(json.dumps({"data": dataclasses.asdict(plan.data), "stages": plan.rows(),
                                    "estimated_total_minutes": None if plan.total_seconds is None
                                    else round(plan.total_seconds / 60, 2), "notes": plan.notes}, indent=2))
        client.log_artifact(run_id, str(path))


STAGE_TIMES_FILE = "stages.json"
THREADS_TAG = "sslpipe.torch_threads"  # on a stage run: torch's thread count in the stage's process


def log_stage_times(run_id: str, stages: list[dict[str, Any]], flow_seconds: float,
                    before_stages_seconds: float) -> None:
    """Where the run's time went, as the flow measured it: stages.json on the parent run, with each stage's
    ``dvc repro`` wall time and (when it ran) its process's start-up and work (``flows.stages.StageOutcome``), the
    flow's seconds so far and those before the first stage (params, checks, the plan's probe).
    ``benchmarks/stage_table.py`` reads it."""
    import json
    import tempfile

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / STAGE_TIMES_FILE
        path.write_text(json.dumps({"flow_seconds": flow_seconds, "before_stages_seconds": before_stages_seconds,
                                    "stages": stages}, indent=2))
        MlflowClient().log_artifact(run_id, str(path))


def log_planned_minutes(run_id: str, plan: RunPlan) -> None:
    """The plan's estimated total as a metric, to compare with the run's own time. Logged after the results:
    MLflow's compare view plots a run's first metric, which should be the final model's test accuracy."""
    from mlflow import MlflowClient

    if plan.total_seconds is not None:
        MlflowClient().log_metric(run_id, "planned_minutes", round(plan.total_seconds / 60, 2))


def log_results(run_id: str, metrics: dict[str, float], files: list[Path]) -> None:
    """Log the headline metrics and result files (those that exist) on ``run_id``: the parent run shows the
    results of the run it stands for, whichever stage computed them."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))


def dataset_entity(params: PipelineParams, root: Path | None = None) -> Any | None:
    """The prepared data in ``root`` as an MLflow dataset, for the runs table's Dataset column; None before ingest.

    Named after its source and data version (``digits v1``, ``folder shapes v3``); its digest is the start of the
    data version's DVC digest (``dataset_hash``: the same as the ``sslpipe.dataset_hash`` tag), or of the
    manifest's md5 where DVC has not locked the data; its profile gives the images per split, the classes, the
    image shape and the source's own version.
    """
    import json

    import pandas as pd
    from mlflow.entities import Dataset

    from ssl_lib.data.layout import SPLITS

    root = root or project_root()
    prepared = root / paths.PREPARED
    try:
        meta = json.loads((prepared / "meta.json").read_text())
        lineage = json.loads((prepared / "lineage.json").read_text()) if (prepared / "lineage.json").is_file() else {}
        splits = pd.read_csv(prepared / "manifest.csv", usecols=["split"])["split"].value_counts()
    except (OSError, ValueError, KeyError):
        return None
    digest = dataset_hash(root) or hashlib.md5((prepared / "manifest.csv").read_bytes()).hexdigest()
    version = lineage.get("data_version")
    source = data_label(params)
    profile = {"num_images": int(splits.sum()),
               "splits": {split: int(splits.get(split, 0)) for split in SPLITS},
               "num_classes": meta.get("num_classes"), "image_shape": "x".join(map(str, meta.get("shape", []))),
               "data_version": version, "digest": digest, "source_version": meta.get("source_version")}
    return Dataset(name=f"{source} v{version}" if version else source, digest=digest[:8], source_type="local",
                   source=json.dumps({"uri": params.data.path or params.data.source}),
                   profile=json.dumps(profile))


def data_summary(dataset: Any | None) -> str | None:
    """A dataset in a line: ``digits v1 (1a2b3c4d): 1797 images, 50 labeled, 30 val, 359 test, 1358 unlabeled``."""
    import json

    if dataset is None:
        return None
    profile = json.loads(dataset.profile)
    splits = ", ".join(f"{profile['splits'][split]} {split}" for split in ("labeled", "val", "test", "unlabeled"))
    return f"`{dataset.name}` ({dataset.digest}): {profile['num_images']} images of {profile['image_shape']}, {splits}"


def log_dataset(run_id: str, params: PipelineParams, context: str, root: Path | None = None) -> None:
    """Log the prepared data as ``run_id``'s input dataset (``context``: what the run used it for)."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = dataset_entity(params, root)
    if dataset is not None:
        MlflowClient().log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def attach_model(run_id: str, model_id: str) -> None:
    """Show a logged model on a run that did not log it: the final model on its parent run (its Logged models)."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput

    MlflowClient().log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


def record_data(run_id: str, params: PipelineParams, root: Path | None = None) -> None:
    """On a parent run, late: the dataset hash tag and the dataset, which exist only once ingest has run."""
    from mlflow import MlflowClient

    digest = dataset_hash(root)
    if digest:
        MlflowClient().set_tag(run_id, "sslpipe.dataset_hash", digest)
    log_dataset(run_id, params, "pipeline", root)


def _resolve_parent(params: PipelineParams) -> tuple[str, bool]:
    """Return (parent run id, whether this process is responsible for closing it)."""
    given = os.environ.get(PARENT_RUN_ENV)
    if given:
        return given, False
    invocation = _dvc_invocation_key() or f"standalone-{os.getpid()}-{time.time_ns()}"
    return open_parent_run(params, invocation, owner="dvc"), True


@contextmanager
def stage_run(stage: str, params: PipelineParams, section: dict[str, Any] | None = None) -> Iterator[str]:
    """Run a stage inside a nested MLflow run; yield the run id.

    ``section`` is the slice of params the stage reads; it is logged on the stage's run.
    """
    import mlflow

    exp_id = experiment_id()
    parent_id, owns_parent = _resolve_parent(params)
    if not owns_parent:  # (open_parent_run ended them already)
        end_dead_runs(exp_id)
    tags = {**common_tags(params), "mlflow.parentRunId": parent_id, "sslpipe.stage": stage, **owner_tags()}
    if "torch" in sys.modules:  # the stages that compute have imported it by now
        tags[THREADS_TAG] = str(sys.modules["torch"].get_num_threads())
    succeeded = False
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags) as run:
            if stage in DATA_CONTEXT:
                log_dataset(run.info.run_id, params, DATA_CONTEXT[stage], Path.cwd())  # DVC's workspace
            if section:
                mlflow.log_params({k: ("null" if v is None else v) for k, v in flatten(section).items()})
            yield run.info.run_id
        succeeded = True
    finally:
        if owns_parent:
            # Each stage closes (and describes) the parent: the last stage of the invocation leaves it final.
            def write_description() -> None:
                record_data(parent_id, params, Path.cwd())
                describe_parent_run(parent_id, params, failed_stage=None if succeeded else stage)

            close_run(parent_id, succeeded, write_description)
