"""One source of defaults: the pydantic sections of ``ssl_lib.config`` hold exactly the values params.yaml states.

A key left out of params.yaml (or of a file a user writes) then keeps the default run's recipe. Compared after
validation (params.yaml's ``20`` is the float param's ``20.0``); ``pretrain.options`` is one value, since a given
options mapping replaces the default whole.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from ssl_lib.config import PipelineParams, parse_params
from tests.helpers import REPO

_MISSING = object()
# Compared as one value: a given mapping replaces the default, it is not merged into it.
WHOLE = {("pretrain", "options")}


def _raw() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def differences(stated: Any, default: Any, path: tuple[str, ...] = ()) -> Iterator[str]:
    """One line per key whose value (or presence) differs between ``stated`` and ``default``, recursively."""
    key = ".".join(path) or "(top level)"
    if isinstance(stated, dict) and isinstance(default, dict):
        for name in [*stated, *(k for k in default if k not in stated)]:
            here, there = stated.get(name, _MISSING), default.get(name, _MISSING)
            if here is _MISSING:
                yield f"{key}.{name}: not in params.yaml (default {there!r})".removeprefix("(top level).")
            elif there is _MISSING:
                yield f"{key}.{name}: {here!r} in params.yaml, no such default".removeprefix("(top level).")
            else:
                yield from differences(here, there, (*path, name))
    elif stated != default or type(stated) is not type(default):
        yield f"{key}: params.yaml says {stated!r}, the default is {default!r}"


def test_params_yaml_states_exactly_the_pydantic_defaults():
    raw = _raw()
    validated = parse_params(raw).model_dump()
    defaults = PipelineParams().model_dump()
    # Keys: params.yaml lists every key the model has, and no other (validation would reject an unknown one).
    problems = [line for line in differences(raw, defaults) if "params.yaml says" not in line]
    # Values: as validated, so that a YAML int for a float param is not a difference.
    problems = list(dict.fromkeys([*problems, *differences(validated, defaults)]))  # a key missing: said once
    assert not problems, "params.yaml and ssl_lib/config.py's defaults differ:\n  " + "\n  ".join(problems)


def _leaves(raw: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, value in raw.items():
        here = (*path, name)
        if isinstance(value, dict) and value and here not in WHOLE:
            yield from _leaves(value, here)
        else:
            yield here


def _without(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    node = result
    for name in path[:-1]:
        node = node[name]
    del node[path[-1]]
    return result


def test_a_key_left_out_of_params_yaml_keeps_the_recipe():
    raw = _raw()
    full = parse_params(raw)
    changed = [".".join(path) for path in _leaves(raw) if parse_params(_without(raw, path)) != full]
    assert not changed, f"leaving these keys out of params.yaml changes the run: {changed}"
    assert parse_params({}) == full


@pytest.mark.parametrize("stated, default, expected", [
    ({"a": {"b": 1}}, {"a": {"b": 1}}, []),
    ({"a": {"b": 1}}, {"a": {"b": 2}}, ["a.b: params.yaml says 1, the default is 2"]),
    ({"a": {"b": 1}}, {"a": {}}, ["a.b: 1 in params.yaml, no such default"]),
    ({"a": {}}, {"a": {"c": None}}, ["a.c: not in params.yaml (default None)"]),
    ({"x": 1}, {"x": 1.0}, ["x: params.yaml says 1, the default is 1.0"]),
])
def test_differences_names_each_key(stated, default, expected):
    assert list(differences(stated, default)) == expected
