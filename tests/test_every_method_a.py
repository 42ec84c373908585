"""Every SSL method through its stages (see tests/every_method.py): the first half of the digits methods, simclr
also through ``dvc exp run`` and ``sslpipe run``, and colorization refused on digits, both ways, with a clear
message and no traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from ssl_lib.methods import METHODS
from tests.every_method import (
    COLOUR_ERROR,
    DIGITS_METHODS,
    RGB_METHODS,
    THROUGH_COMMANDS,
    VIT_METHODS,
    dvc_exp_run,
    method_half_tests,
    sslpipe_run,
)
from tests.helpers import use_project

pytestmark = pytest.mark.slow

# test_every_method_b.py runs DIGITS_METHODS[1::2]
project, test_method_runs_through_its_stages, test_every_experiment_records_its_method = \
    method_half_tests(DIGITS_METHODS[0::2], "every_method_a")


def test_the_lists_cover_every_method():
    assert len(METHODS) == 14
    assert RGB_METHODS == {"colorization"} and VIT_METHODS == {"mae", "autoregressive"}
    assert set(DIGITS_METHODS[0::2]) | set(DIGITS_METHODS[1::2]) | RGB_METHODS == set(METHODS)
    assert set(THROUGH_COMMANDS) <= set(DIGITS_METHODS[0::2])  # a method of this half takes the commands for real


def test_colorization_on_digits_fails_clearly_through_dvc(project: Path, monkeypatch: pytest.MonkeyPatch):
    use_project(project, monkeypatch)
    out = dvc_exp_run(project, "colorization")
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    # Rejected by the first stage that sees the images, before any pseudo label or training step.
    assert "failed to reproduce 'pseudo_labels'" in output and "exited with 2" in output, output
    assert all(fragment in output for fragment in COLOUR_ERROR), output
    assert "folder" in output  # ... and the source that fits
    assert "Traceback" not in output


def test_colorization_on_digits_fails_clearly_through_sslpipe(project: Path, monkeypatch: pytest.MonkeyPatch):
    use_project(project, monkeypatch)
    params_before = (project / "params.yaml").read_text()
    result = sslpipe_run(project, "pretrain.method=colorization")
    assert result.exit_code == 2, result.output
    assert all(fragment in result.output for fragment in COLOUR_ERROR), result.output
    assert "folder" in result.output and "Traceback" not in result.output
    assert (project / "params.yaml").read_text() == params_before  # rejected before anything was written
