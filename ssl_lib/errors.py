"""Mistakes a user can fix, as one exception family.

Stages print a ``UserError`` as one line and exit 2, and the flow does not retry it; any other exception is
a bug (or a transient failure) and keeps its traceback. The classes also derive from ``ValueError`` so that
code validating input (pydantic validators, callers that expect ``ValueError``) keeps working.

``format_validation_errors`` words a pydantic error for the user, one line per key. It lives here, with no
dependency of its own, so that both the params (``ssl_lib.config``) and the method options
(``ssl_lib.methods.base``) use it without importing each other.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

UNKNOWN_KEY = "unknown key; check its spelling against params.yaml's documented keys"


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


def format_validation_errors(err: ValidationError, origin: str, loc_prefix: tuple[str, ...] = (),
                             unknown_key: Callable[[tuple[Any, ...]], str] | None = None) -> str:
    """One line per problem, ``key.path: message``; ``loc_prefix`` places a nested model's errors in params.yaml.

    ``unknown_key(loc)`` words an unknown key at ``loc`` (the full key path), for instance with the keys allowed
    there; without it, ``UNKNOWN_KEY``.
    """
    lines = [f"invalid parameters in {origin}:"]
    for e in err.errors():
        loc = (*loc_prefix, *e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown_key(loc) if unknown_key is not None else UNKNOWN_KEY
        elif e["type"] in ("literal_error", "model_type") or e["type"].endswith(("_parsing", "_type")):
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  - {key}: {msg}")
    return "\n".join(lines)
