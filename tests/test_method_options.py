"""Typed method options: every method's ``Options`` model, their validation at params load (one ConfigError
naming the full key), the class-level requirements, and the README table generated from the models."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from ssl_lib.config import ConfigError, parse_params
from ssl_lib.errors import MethodRequirementError
from ssl_lib.methods import METHODS, SSLMethod, UnknownMethodError, get_method
from ssl_lib.methods.base import MethodOptions
from ssl_lib.methods.options_table import default_text, readme_section, render
from ssl_lib.models.backbones import NormalizedEncoder, build_backbone
from tests.helpers import REPO


def _config_error(options: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params({"pretrain": {"options": options}})
    return str(info.value)


def _problems(message: str) -> list[str]:
    return [line for line in message.splitlines() if line.startswith("  - ")]


# --- validation at load: one ConfigError naming the full key --------------------------------------

@pytest.mark.parametrize("value, fragment", [
    ("hot", "valid number"),  # wrong type
    (-1, "greater than 0"),  # out of range
    (0, "greater than 0"),
])
def test_bad_option_value_names_the_full_key(value, fragment):
    problems = _problems(_config_error({"simclr": {"temperature": value}}))
    assert len(problems) == 1, problems
    assert problems[0].startswith("  - pretrain.options.simclr.temperature: ") and fragment in problems[0]


def test_unknown_option_names_the_key_and_the_allowed_ones():
    problems = _problems(_config_error({"simclr": {"temprature": 0.1}}))
    assert len(problems) == 1, problems
    assert problems[0].startswith("  - pretrain.options.simclr.temprature: unknown option")
    assert "allowed:" in problems[0] and "temperature" in problems[0]


def test_unknown_method_key_lists_the_methods():
    problems = _problems(_config_error({"bogus": {"x": 1}}))
    assert len(problems) == 1 and problems[0].startswith("  - pretrain.options.bogus: unknown method")
    assert all(name in problems[0] for name in METHODS)


def test_every_problem_in_the_options_is_listed_at_once():
    problems = _problems(_config_error({"jigsaw": {"grid": 2, "num_permutations": 25},
                                        "mae": {"decoder_dim": 64, "decoder_heads": 3},
                                        "byol": {"momentum": 1.0}, "rotation": {"augment": "maybe"}}))
    keys = sorted(line.split(":")[0].removeprefix("  - ") for line in problems)
    assert keys == ["pretrain.options.byol.momentum", "pretrain.options.jigsaw.num_permutations",
                    "pretrain.options.mae.decoder_heads", "pretrain.options.rotation.augment"]


def test_options_keep_what_was_set_in_order_coerced():
    params = parse_params({"pretrain": {"method": "simclr",
                                        "options": {"simclr": {"temperature": 1, "crop_scale_min": 0.5},
                                                    "rotation": {}}}})
    assert params.pretrain.options == {"simclr": {"temperature": 1.0, "crop_scale_min": 0.5}, "rotation": {}}
    assert list(params.pretrain.method_options()) == ["temperature", "crop_scale_min"]
    assert isinstance(params.pretrain.method_options()["temperature"], float)


# --- the models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_options_construct_with_defaults_that_pass_their_own_bounds(name):
    cls = get_method(name)
    assert issubclass(cls.Options, MethodOptions) and cls.Options is not MethodOptions
    defaults = cls.Options()
    # pydantic does not validate defaults: round-trip them through validation to check the bounds.
    assert cls.Options.model_validate(defaults.model_dump()) == defaults
    assert cls.resolve_options(None) == defaults and cls.resolve_options({}) == defaults
    assert cls.resolve_options(defaults) is defaults
    assert all(field.description for field in cls.Options.model_fields.values()), "the README table needs them"
    with pytest.raises(ValidationError):
        cls.Options(bogus=1)  # extra="forbid"
    field = next(iter(cls.Options.model_fields))
    with pytest.raises(ValidationError):
        setattr(defaults, field, getattr(defaults, field))  # frozen


def test_resolve_options_raises_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"pretrain\.options\.moco\.queue_size: Input should be greater"):
        get_method("moco").resolve_options({"queue_size": 0})
    with pytest.raises(ConfigError, match="temprature.*allowed.*temperature"):
        get_method("simclr").resolve_options({"temprature": 0.5})


def test_resolve_options_takes_only_its_own_options_class():
    simclr, moco = get_method("simclr"), get_method("moco")
    with pytest.raises(TypeError, match=r"method 'moco' takes a mapping of options or a MoCo\.Options, not a "
                                        r"SimCLR\.Options"):
        moco.resolve_options(simclr.Options())


def test_a_method_is_generic_in_its_own_options_class():
    class Other(MethodOptions):
        pass

    class Good(SSLMethod["Good.Options"]):
        class Options(MethodOptions):
            size: int = 1

    assert Good.resolve_options({"size": 2}).size == 2
    with pytest.raises(TypeError, match=r"Bad\.Options is .*Bad\.Options, but the class is declared generic in "
                                        r".*Other: make the two the same class"):
        class Bad(SSLMethod[Other]):
            class Options(MethodOptions):
                pass
    with pytest.raises(TypeError, match="declared generic in ViewOptions"):
        from ssl_lib.methods.views import TwoViewMethod

        class NotViews(TwoViewMethod):  # inherits TwoViewMethod[ViewOptionsT]: Options must be a ViewOptions
            Options = Other


def test_method_gets_typed_options_and_rejects_bad_ones():
    encoder, dim = build_backbone("convnet_small", 1, 16)
    model = get_method("simclr")(NormalizedEncoder(encoder, [0.5], [0.25]), dim, 1, 16, temperature=0.5)
    assert model.options.temperature == 0.5 and model.options.proj_dim == 128
    with pytest.raises(ConfigError, match=r"pretrain\.options\.simclr\.jitter_strength"):
        get_method("simclr")(NormalizedEncoder(encoder, [0.5], [0.25]), dim, 1, 16, jitter_strength=1.5)


def test_jigsaw_permutations_bounded_by_the_grid():
    jigsaw = get_method("jigsaw")
    assert jigsaw.Options(grid=3, num_permutations=100).num_permutations == 100
    assert jigsaw.Options(grid=2, num_permutations=math.factorial(4)).num_permutations == 24
    with pytest.raises(ValidationError, match="only 24 permutations"):
        jigsaw.Options(grid=2, num_permutations=25)


# --- requirements and error types -----------------------------------------------------------------

def test_requirements_are_declared_on_the_base_class():
    assert SSLMethod.required_backbone is None and SSLMethod.required_channels is None
    assert {n for n, c in METHODS.items() if c.required_backbone} == {"mae", "autoregressive"}
    assert {n for n, c in METHODS.items() if c.required_channels} == {"colorization"}
    assert get_method("mae").required_backbone == "vit_tiny" and get_method("colorization").required_channels == 3


def test_requirement_and_lookup_errors_are_user_errors():
    assert issubclass(UnknownMethodError, ConfigError)
    with pytest.raises(UnknownMethodError):
        get_method("sift")
    with pytest.raises(MethodRequirementError, match="3-channel"):
        get_method("colorization").check_data(1)
    encoder, dim = build_backbone("convnet_small", 1, 16)
    with pytest.raises(MethodRequirementError, match="vit_tiny"):
        get_method("mae")(NormalizedEncoder(encoder, [0.5], [0.25]), dim, 1, 16)
    # Images the ViT's patches cannot tile: a user's data, so a user error naming the sides that fit.
    for method in ("mae", "autoregressive"):
        with pytest.raises(MethodRequirementError, match="multiple of 4 or 7"):
            get_method(method).check_data(1, 30)
        get_method(method).check_data(1, 28)
    get_method("simclr").check_data(1, 30)


# --- documentation --------------------------------------------------------------------------------

def test_readme_table_is_the_generated_one():
    section = readme_section((REPO / "README.md").read_text())
    assert section, "README.md lost its generated method-options section"
    assert section == render(), "README.md is stale: run python -m ssl_lib.methods.options_table --write"


def test_params_yaml_lists_the_default_methods_options():
    text = (REPO / "params.yaml").read_text()
    assert 'README.md "Method options"' in text
    simclr = get_method("simclr").Options()
    for key, value in simclr.model_dump().items():
        assert f"{key}: {default_text(value)}" in text, key
