"""Wall and monotonic time behind one small interface.

The center reads time only through a :class:`Clock`, so that it can notice wall-clock steps
(comparing the two) and so that tests of the scheduling decisions
(:class:`~cronfile.center.scheduler.Scheduler`, which takes ``now`` as an argument) can move time by
hand with :class:`FakeClock` instead of sleeping. Waiting itself stays on the event loop.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (what schedules are written in)."""

    def monotonic(self) -> float:
        """Seconds that never jump (to notice when the wall clock does)."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when a test says so."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    def step_wall(self, seconds: float) -> None:
        """The wall clock jumps (NTP step, manual change); monotonic time does not."""
        self.now += seconds
