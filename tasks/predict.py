"""Batch predictions from a registered classifier: a folder of images or a prepared split in, a CSV out."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from tasks import paths

log = logging.getLogger("sslpipe.predict")

SPLIT_PREFIX = "split:"


@dataclass(frozen=True)
class LoadedModel:
    model: object
    channels: int
    height: int
    width: int
    class_names: list[str]


MODEL_URI_HELP = ("Use models:/NAME@champion, models:/NAME/VERSION or runs:/RUN_ID/classifier, with "
                  "MLFLOW_TRACKING_URI pointing at the store that has it (`sslpipe run` registers one)")
# MLflow's codes for a model that is not there or a URI it cannot parse. Anything else (a tracking
# server that does not answer, a database error) is not the user's to fix here and keeps its traceback.
_MISSING_MODEL_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
# models:/NAME/VERSION, models:/NAME/STAGE, models:/NAME@ALIAS, or MLflow 3's models:/MODEL_ID
_MODEL_URI = re.compile(r"^models:/[^/@]+(/[^/]+|@[^/]+)?$")


def load_model(model_uri: str) -> LoadedModel:
    """Load a registry or run model and read its input layout from the logged signature.

    A model that does not exist (or a malformed URI) raises DataError with the URI forms that work.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from ssl_lib.errors import DataError
    from tasks.mlflow_pytorch import import_mlflow_pytorch

    if model_uri.startswith("models:") and not _MODEL_URI.match(model_uri):
        # MLflow reports a malformed models:/ URI as an INTERNAL_ERROR, indistinguishable from a server fault.
        raise DataError(f"model URI {model_uri!r} is malformed. {MODEL_URI_HELP}")
    try:
        info = get_model_info(model_uri)
        # Logged as a torch.export program: already in inference mode, and .eval() is not supported on it.
        model = import_mlflow_pytorch().load_model(model_uri, map_location="cpu")
    except MlflowException as err:
        if err.error_code not in _MISSING_MODEL_CODES:
            raise
        raise DataError(f"cannot load model {model_uri!r}: {err}. {MODEL_URI_HELP}") from None
    except FileNotFoundError as err:  # registered, but its files are gone from the artifact store
        raise DataError(f"cannot load model {model_uri!r}: {err}. Its artifacts are missing; register it "
                        f"again (sslpipe run --force) or pick another version. {MODEL_URI_HELP}") from None
    specs = info.signature.inputs.inputs if info.signature is not None and info.signature.inputs else []
    shape = getattr(specs[0], "shape", None) if specs else None  # (-1, C, H, W)
    if shape is None or len(shape) != 4:
        # The input layout is read from the signature every classifier of this pipeline is logged with.
        raise DataError(f"model {model_uri!r} has no (N, C, H, W) input signature, so it was not logged by this "
                        f"pipeline. {MODEL_URI_HELP}")
    class_names = list((info.metadata or {}).get("class_names") or [])
    if not class_names:
        num_classes = info.signature.outputs.inputs[0].shape[-1]
        class_names = [str(i) for i in range(num_classes)]
    return LoadedModel(model, int(shape[1]), int(shape[2]), int(shape[3]), class_names)


def _source_images(source: str, loaded: LoadedModel, prepared_dir: Path) -> tuple[list[str], np.ndarray, list]:
    if source.startswith(SPLIT_PREFIX):
        from ssl_lib.data.prepared import load_prepared

        split = source[len(SPLIT_PREFIX):]
        data = load_prepared(prepared_dir)
        index = data.indices(split)
        return list(data.manifest["source_id"].iloc[index]), np.asarray(data.images[index]), []
    from ssl_lib.data.images import read_images

    batch = read_images(source, loaded.channels, loaded.height, loaded.width)
    return batch.paths, batch.images, batch.failed


def _probabilities(model, images: np.ndarray, batch_size: int, num_classes: int) -> np.ndarray:
    import torch

    outputs = [np.zeros((0, num_classes), dtype=np.float32)]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32) / 255.0
            logits = model(torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous())
            outputs.append(torch.softmax(logits, dim=1).numpy())
    return np.concatenate(outputs)


def _check_fits(loaded: LoadedModel, images: np.ndarray, source: str) -> None:
    if images.shape[1:] != (loaded.height, loaded.width, loaded.channels):
        # Image files are resized to the model's input, so only a prepared split of other data gets here.
        from ssl_lib.errors import DataError

        raise DataError(f"{source}: images are {images.shape[1:]} but the model takes "
                        f"{(loaded.height, loaded.width, loaded.channels)}; predict with a model trained on "
                        "this data, or pass a folder of images instead of a split")


def _nothing_to_predict(source: str) -> NoReturn:
    from ssl_lib.data.files import IMAGE_EXTENSIONS
    from ssl_lib.errors import DataError

    if source.startswith(SPLIT_PREFIX):
        raise DataError(f"{source}: the split holds no image; pick another (split:test, split:val, ...)")
    raise DataError(f"{source} holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))}, in it or any "
                    "sub-folder): nothing to predict; point it at a folder of images or an image file")


def split_accuracy(model_uri: str, prepared_dir: str | Path = paths.PREPARED, split: str = "test",
                   batch_size: int = 512) -> float:
    """Accuracy of a registered model on a split of the prepared data (DataError when it was trained for other
    images or other classes)."""
    from ssl_lib.data.prepared import load_prepared
    from ssl_lib.errors import DataError

    loaded = load_model(model_uri)
    data = load_prepared(Path(prepared_dir))
    images, labels = data.split(split)
    _check_fits(loaded, np.asarray(images), f"{SPLIT_PREFIX}{split}")
    if list(loaded.class_names) != list(data.class_names):
        raise DataError(f"model {model_uri!r} predicts the classes {loaded.class_names}, the data has "
                        f"{data.class_names}")
    probs = _probabilities(loaded.model, np.asarray(images), batch_size, len(loaded.class_names))
    return float((probs.argmax(1) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def predict(source: str, model_uri: str, output: str | Path, prepared_dir: str | Path = paths.PREPARED,
            batch_size: int = 512) -> pd.DataFrame:
    """Write ``output`` (CSV): id, predicted class, one probability column per class, status and error.

    An unreadable image gets a row with status ``error`` and the reason; the rest of the batch goes on.
    """
    from ssl_lib.io import atomic_path

    loaded = load_model(model_uri)
    ids, images, failed = _source_images(source, loaded, Path(prepared_dir))
    if not ids and not failed:  # an empty CSV and "wrote 0 predictions" would pass for a result
        _nothing_to_predict(source)
    _check_fits(loaded, images, source)
    probs = _probabilities(loaded.model, images, batch_size, len(loaded.class_names))
    table = pd.DataFrame({"id": ids, "predicted_class": [loaded.class_names[i] for i in probs.argmax(1)],
                          "confidence": probs.max(1) if len(probs) else [], "status": "ok", "error": ""})
    for j, name in enumerate(loaded.class_names):
        table[f"prob_{name}"] = probs[:, j]
    if failed:
        errors = pd.DataFrame({"id": [p for p, _ in failed], "status": "error", "error": [r for _, r in failed]})
        table = pd.concat([table, errors], ignore_index=True)
        log.warning("%d unreadable image(s) reported in %s", len(failed), output)
    with atomic_path(output) as tmp:
        table.to_csv(tmp, index=False)
    log.info("wrote %d predictions (%d errors) to %s", len(ids), len(failed), output)
    return table
