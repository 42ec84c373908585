"""Mistakes a user can fix, as one exception family.

Stages print a ``UserError`` as one line and exit 2, and the flow does not retry it; any other exception is
a bug (or a transient failure) and keeps its traceback. The classes also derive from ``ValueError`` so that
code validating input (pydantic validators, callers that expect ``ValueError``) keeps working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something in the user's params, data or environment must change; the message says what."""


class ConfigError(UserError):
    """A mistake in params.yaml or in an override; the message names the key and the fix."""


class DataError(UserError):
    """A data source, split budget or prepared dataset is unusable; the message says how to fix it."""


class LabelBudgetError(DataError):
    """Too few labeled (or validation) images for what the params ask of them."""


class MethodRequirementError(UserError):
    """The chosen method cannot train on this data or backbone (channels, image size, architecture)."""


class TrainingDiverged(UserError):
    """A training loss became NaN or infinite: the run stops there, and nothing it trained is kept or registered.

    A user matter: the usual cause is a learning rate too high for the data and batch size, which the user sets.
    """

    @classmethod
    def at(cls, phase: str, step: int, total: int, value: float, lr: float, key: str | None) -> TrainingDiverged:
        """The error for ``phase``'s loss ``value`` at ``step`` (1-based) of ``total``; ``key`` is the param that
        sets its learning rate ``lr`` (None: the caller names it)."""
        return cls(f"the {phase} loss is {value} at step {step} of {total}: training diverged; lower "
                   f"{key or 'the learning rate'} (now {lr:g}), or check the data for broken images")
