"""The one exception type for data problems the user can fix."""
from __future__ import annotations


class DataError(ValueError):
    """A data source, split budget or prepared dataset is unusable; the message says how to fix it."""
