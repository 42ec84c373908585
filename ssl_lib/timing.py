"""Where a training loop's time goes: wall-clock seconds per named phase, for the history rows. How long, never what.

A ``Laps`` clock charges the time since its previous mark to a phase: ``laps.lap("data")`` once a batch is ready,
``laps.lap("step")`` after the optimizer step, and so on round the loop; ``totals()`` gives the seconds per phase
(every phase named at construction, 0 where none was charged) and starts over. ``benchmarks/stage_table.py`` sets
these against the FLOPs of a step.

It reads a clock and nothing else: no random numbers, no tensor operation, no wait for a device in the loop, so a
loop computes the same numbers with it as without (on a CPU, the tiny digits pipeline wrote byte-identical weights,
metrics and predictions with and without it). On CUDA the host runs ahead of the device, and a host clock would
time kernel launches; there each mark is a CUDA event recorded on the current stream (recording waits for nothing),
a phase is the device time between two marks, and ``totals()`` waits for the last mark only, which the loops call
after their own end-of-epoch read of the loss has waited for the device already. Any other device reads the host
clock.
"""
from __future__ import annotations

import time
from typing import Any


class Laps:
    """Seconds per phase of a loop, from consecutive marks (see the module's docstring)."""

    def __init__(self, device: Any, phases: tuple[str, ...]) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.phases = phases
        self._seconds = dict.fromkeys(phases, 0.0)
        self._events: list[tuple[str, Any, Any]] = []  # CUDA: (phase, start event, end event), read in totals()
        self._last: Any = None

    def _mark(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Mark the start: what came before is charged to no phase."""
        self._last = self._mark()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous mark (``start`` or ``lap``) to ``phase``."""
        now = self._mark()
        if self.cuda:
            self._events.append((phase, self._last, now))
        else:
            self._seconds[phase] = self._seconds.get(phase, 0.0) + (now - self._last)
        self._last = now

    def totals(self) -> dict[str, float]:
        """Seconds per phase since ``start``; the clock then starts over (call ``start`` again)."""
        if self._events:
            self._events[-1][2].synchronize()  # the last mark: every earlier one has completed before it
            for phase, begin, end in self._events:
                self._seconds[phase] = self._seconds.get(phase, 0.0) + begin.elapsed_time(end) / 1000.0
        totals = self._seconds
        self._seconds, self._events = dict.fromkeys(self.phases, 0.0), []
        return totals

    def columns(self) -> dict[str, float]:
        """``totals()`` as history columns: ``{"data_seconds": ..., "step_seconds": ...}``."""
        return {f"{phase}_seconds": seconds for phase, seconds in self.totals().items()}
