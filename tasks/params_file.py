"""Apply overrides to params.yaml the way `dvc exp run -S` does: validated first, comments kept, written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ssl_lib.config import PipelineParams, apply_overrides, parse_params, read_raw_params
from ssl_lib.io import atomic_path


def params_with_overrides(path: Path, overrides: dict[str, Any], origin: str | None = None) -> PipelineParams:
    """params.yaml with ``overrides`` applied, validated; the file is not touched."""
    return parse_params(apply_overrides(read_raw_params(path), overrides),
                        origin=origin or f"{path} with overrides {overrides}")


def apply_param_overrides(path: Path, overrides: dict[str, Any]) -> PipelineParams:
    """Validate params.yaml with ``overrides`` applied; write them into the file only if they are valid.

    The file stays the one record DVC hashes, so a flow run with overrides and
    ``dvc exp run -S key=value`` leave the workspace in the same state.
    """
    params = params_with_overrides(path, overrides)
    if not overrides:
        return params

    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip mode keeps the documenting comments in params.yaml
    yaml.preserve_quotes = True
    # Keep `key: null` as written (ruamel would write an empty value): only overridden lines change.
    yaml.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        node = document
        parts = dotted.split(".")
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            yaml.dump(document, fh)
    reread = read_raw_params(path)
    if parse_params(reread) != params:
        # The overrides were valid, so a file that reads back differently is this writer's bug, not the user's.
        raise RuntimeError(f"internal error: {path} did not round-trip the overrides {overrides}")
    return params
