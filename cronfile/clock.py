"""Wall and monotonic time behind one small interface, so the scheduler can be tested with
a clock that tests move by hand (no sleeping in tests)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (what schedules are written in)."""

    def monotonic(self) -> float:
        """Seconds that never jump (to notice when the wall clock does)."""

    async def sleep(self, seconds: float) -> None:
        """Wait this long (or less: the scheduler re-checks the time when it wakes)."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when a test says so; ``sleep`` returns at once after yielding,
    so a scheduler loop under test advances exactly as far as the test moves time."""

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

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)
