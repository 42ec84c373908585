"""Progress bars that suit where they are shown: tqdm's bar on a terminal (or in a notebook), one plain line every
few seconds anywhere else.

tqdm redraws its bar in place with carriage returns. In a log file or a pipe (a Prefect log, ``make run > log``)
those frames pile up into one endless line, so there the bar is printed as a whole line, at most every
``$SSLPIPE_PROGRESS_SECONDS`` seconds (30 by default), plus its first and last state.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

INTERVAL_ENV = "SSLPIPE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


class _Lines:
    """A file-like object that turns tqdm's in-place frames (``\\r`` + text + padding) into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:  # the padding and the bare newline tqdm writes on close carry nothing
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    # A Jupyter kernel's streams are no terminals, but tqdm.auto draws its widget there.
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def log_interval() -> float:
    """Seconds between two progress lines when the output is not a terminal."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, stream: TextIO | None = None,
                 **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or with ``total=``), drawn for a terminal or printed as lines for a log.

    ``enabled=False`` gives a silent bar. Otherwise tqdm's own switches still apply (``TQDM_DISABLE=1``), and
    ``kwargs`` go to tqdm as they are.
    """
    if not enabled:
        kwargs["disable"] = True
    target = stream if stream is not None else sys.stderr
    if _interactive(target):
        from tqdm.auto import tqdm

        return tqdm(iterable, file=target, **kwargs)
    from tqdm.std import tqdm as plain_tqdm

    interval = log_interval()
    # maxinterval = mininterval: tqdm's monitor thread then prints the state at that pace even between updates.
    options = {"mininterval": interval, "maxinterval": interval, "ascii": True, "ncols": 100,
               "dynamic_ncols": False, **kwargs}
    return plain_tqdm(iterable, file=_Lines(target), **options)
