"""Data problems the user can fix: ``DataError`` (defined with the rest of the family in ``ssl_lib.errors``)."""
from __future__ import annotations

from ssl_lib.errors import DataError, LabelBudgetError

__all__ = ["DataError", "LabelBudgetError"]
