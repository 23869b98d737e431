"""A Center built in-process for tests of its logic: real files, real jobs, this process.

:class:`ShiftedClock` lets a test start a center "later" (after an outage, a backoff, just
before a slot) instead of sleeping; :class:`Phase` is one center's life on a directory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from centerlib import read_jsonl

from cronfile.center.daemon import Center
from cronfile.center.options import CenterOptions


class ShiftedClock:
    """The system clock moved ``shift`` seconds ahead: a center that starts "later" than
    the previous one stopped, without the test waiting for it."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def time(self) -> float:
        return time.time() + self.shift

    def monotonic(self) -> float:
        return time.monotonic()


class Phase:
    """One center's life on a schedules and state directory, until ``until`` holds for its
    run records (bounded), then a planned stop."""

    def __init__(self, root: Path) -> None:
        self.schedules = root / "schedules"
        self.state = root / "state"
        self.schedules.mkdir(parents=True, exist_ok=True)

    def write(self, jobs: str) -> None:
        (self.schedules / "a.yaml").write_text("apiVersion: cronfile/v1\njobs:\n" + jobs)

    def runs(self) -> list[dict[str, Any]]:
        return read_jsonl(self.state / "runs.jsonl")

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.state / "events.jsonl")

    def run(self, until: Callable[[Center, list[dict[str, Any]]], Any], clock: ShiftedClock,
            what: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        center = Center(CenterOptions(schedules=self.schedules, state=self.state, shutdown_grace_s=1.0,
                                      watch=False), clock=clock)

        async def life() -> Any:
            task = asyncio.create_task(center.run_until_stopped())
            deadline = time.monotonic() + timeout
            result = None
            while not task.done() and time.monotonic() < deadline:
                result = until(center, self.runs())
                if result:
                    break
                await asyncio.sleep(0.02)
            center.request_stop()
            assert await asyncio.wait_for(task, 30) == 0
            return result

        assert asyncio.run(life()), f"timed out waiting for {what}"
        return self.runs()
