"""The scheduler loop: one tick hands every due action to the dispatcher, then the
bookkeeping that follows a tick (watermark, waiting starts, ``places.json``, expectations).

The tick's own time is the watermark's bound: every slot up to it was handed to
``perform()``, so a tick that stalled handled nothing after it; starts that wait (a retry
delay, a parked start) hold the mark below them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cronfile.center.agents import write_agents_file
from cronfile.center.dispatch import Dispatcher
from cronfile.center.journal import Journal
from cronfile.center.outcomes import Outcomes
from cronfile.center.parking import Parking
from cronfile.center.pools import PlaceGate
from cronfile.center.scheduler import Scheduler
from cronfile.center.statefiles import write_places_file
from cronfile.clock import Clock
from cronfile.transports.hub import AgentHub

if TYPE_CHECKING:  # psycopg is imported only by a center started with --ha
    from cronfile.center.standby import HaCoordinator

log = logging.getLogger("cronfile.center")


class Ticker:
    """``hub()``: the agent hub once it listens; ``pool_caps()``: the pools the jobs use;
    ``ha_view_changed()`` / ``write_center_file()``: keep ``center.json`` current with HA."""

    def __init__(self, *, clock: Clock, scheduler: Scheduler, dispatcher: Dispatcher,
                 journal: Journal, outcomes: Outcomes, places: PlaceGate, parking: Parking,
                 ha: HaCoordinator | None, state_dir: Path, hub: Callable[[], AgentHub | None],
                 pool_caps: Callable[[], dict[str, int]],
                 ha_view_changed: Callable[[], bool], write_center_file: Callable[[], None],
                 wake: asyncio.Event, stopping: asyncio.Event) -> None:
        self.clock = clock
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.journal = journal
        self.outcomes = outcomes
        self.places = places
        self.parking = parking
        self.ha = ha
        self.state_dir = state_dir
        self.hub = hub
        self.pool_caps = pool_caps
        self.ha_view_changed = ha_view_changed
        self.write_center_file = write_center_file
        self.wake = wake
        self.stopping = stopping
        self.last_tick: float | None = None  # every slot up to it was handed to perform()
        self.standby_tick: float | None = None  # HA: the last tick whose actions were dropped
        self._last_expect_check = 0.0
        self._places_written, self._places_written_at = -1, 0.0

    async def run(self) -> None:
        dispatcher, journal, clock = self.dispatcher, self.journal, self.clock
        mono0, wall0 = clock.monotonic(), clock.time()
        while not self.stopping.is_set():
            now = clock.time()
            drift = now - (wall0 + clock.monotonic() - mono0)
            if abs(drift) > 2.0:
                journal.event("clock_step", seconds=round(drift, 3))
                log.warning("wall clock stepped by %+.1fs", drift)
                mono0, wall0 = clock.monotonic(), now
            dispatcher.end_deferred_runs()
            await dispatcher.unpark(now)
            dispatcher.begin_burst()  # from the tick on: it makes the objects of every due run
            try:
                actions = self.scheduler.tick(now)
                if self.ha is not None and not self.ha.leading():
                    actions = []  # a standby keeps its timers current and does nothing
                    self.standby_tick = now
                await dispatcher.perform(actions, wait=False)
            finally:
                dispatcher.end_burst()
            # Stamped with the tick's own time: a tick that stalled handled nothing after it.
            self.last_tick = now
            journal.write_watermark(clock.time(), self.watermark_mark())
            if self.places.waiting_count():
                dispatcher.expire_waiting(now)
            self._write_places(now)
            if now - self._last_expect_check >= 5.0:
                self._last_expect_check = now
                self.outcomes.check_success_within(self.scheduler.job)
                hub = self.hub()
                if hub is not None:
                    write_agents_file(self.state_dir, hub)
            if self.ha is not None and self.ha_view_changed():
                self.write_center_file()  # role, term, lease: at most once a tick
            due = self.scheduler.next_due()
            delay = 1.0 if due is None else min(max(due - clock.time(), 0.0), 1.0)
            if delay > 0:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=delay)

    def _write_places(self, now: float) -> None:
        """``places.json`` for ``status``: when pools or caps exist and their use moved, at
        most once a second."""
        places, pool_caps = self.places, self.pool_caps()
        if (pool_caps or places.agent_caps) and places.version != self._places_written \
                and now - self._places_written_at >= 1.0:
            self._places_written, self._places_written_at = places.version, now
            with contextlib.suppress(OSError):
                write_places_file(self.state_dir, places.snapshot(pool_caps, now))

    def watermark_mark(self) -> float | None:
        """Every slot up to the mark was handed to perform(): the last tick's time (not the
        clock's: a tick that stalled handled nothing after it), held below starts that
        wait (delayed, parked)."""
        if self.last_tick is None:
            return None
        floors = [f - 0.001 for f in (self.scheduler.pending_start_floor(), self.parking.floor())
                  if f is not None]
        return min([self.last_tick, *floors])
