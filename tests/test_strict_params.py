"""Strict booleans and integers in params (issue #28): `pretrain.epochs=true` is not 1 epoch, `finetune.augment=1`
is not True, and a float param takes no boolean; what YAML writes for numbers still loads."""
from __future__ import annotations

import pytest
import yaml

from ssl_lib.config import ConfigError, load_params, parse_params
from tests.helpers import REPO


@pytest.mark.parametrize("section, key, value, expected", [
    ("pretrain", "epochs", True, "valid integer (got True)"),
    ("pretrain", "epochs", 2.5, "valid integer (got 2.5)"),
    ("pretrain", "epochs", "3", "valid integer (got '3')"),
    ("seed", None, False, "valid integer (got False)"),
    ("data", "labels_per_class", True, "valid integer (got True)"),
    ("finetune", "augment", 1, "valid boolean (got 1)"),
    ("self_train", "balance", "yes", "valid boolean (got 'yes')"),
    ("pretrain", "lr", True, "a number, not a boolean (got True)"),
    ("evaluate", "champion_margin", False, "a number, not a boolean (got False)"),
])
def test_a_boolean_is_not_a_number_nor_a_number_a_boolean(section: str, key: str | None, value, expected: str):
    raw = {section: value} if key is None else {section: {key: value}}
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert f"{section}{'.' + key if key else ''}: " in str(info.value) and expected in str(info.value), info.value


def test_what_yaml_writes_for_numbers_still_loads(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pretrain"].update({"lr": "1e-3", "epochs": 3, "compile": True})  # PyYAML reads `1e-3` as a string
    raw["finetune"]["lr"] = 1  # an int for a float
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    assert params.pretrain.lr == 1e-3 and params.pretrain.epochs == 3 and params.pretrain.compile is True
    assert params.finetune.lr == 1.0 and isinstance(params.finetune.lr, float)
    assert parse_params(params.model_dump(mode="json")) == params  # a run's params read back as they were


@pytest.mark.parametrize("options, expected", [
    ({"simclr": {"temperature": True}}, "pretrain.options.simclr.temperature: Input should be a number, not a boolean"),
    ({"autoencoder": {"decoder_width": 2.5}}, "pretrain.options.autoencoder.decoder_width: Input should be a valid "
                                              "integer (got 2.5)"),
    ({"autoencoder": {"decoder_width": True}}, "pretrain.options.autoencoder.decoder_width: Input should be a number"),
])
def test_method_options_are_as_strict(options: dict, expected: str):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_params({"pretrain": {"options": options}})
    given = {"simclr": {"temperature": "1e-3"}, "autoencoder": {"decoder_width": 8}}  # YAML's 1e-3 is a string
    ok = parse_params({"pretrain": {"options": given}})
    assert ok.pretrain.options == {"simclr": {"temperature": 1e-3}, "autoencoder": {"decoder_width": 8}}
