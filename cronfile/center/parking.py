"""Starts that wait, right after a restart, for an agent that was connected before.

SPEC §2: ``no_agent`` only for an agent that is not reachable; one reconnecting within a
second is. So for a bounded time after a restart (:func:`reconnect_grace_s`), a start that
needs such an agent is parked instead of recorded; it is started once the agent is back, or
recorded when the time is up.
"""

from __future__ import annotations

from collections.abc import Iterable

from cronfile.center.options import CenterOptions
from cronfile.center.scheduler import StartRun


def reconnect_grace_s(options: CenterOptions) -> float:
    """How long after a restart a start waits for an agent that was connected before:
    agents notice the restart at once and reconnect after a short random backoff; a few
    heartbeats bound it, and never more than 30 s."""
    return min(max(3 * options.heartbeat_s, 3.0), 30.0)


class Parking:
    def __init__(self) -> None:
        self.awaiting: set[str] = set()  # agents of the previous center not back yet
        self.deadline = 0.0
        self.parked: list[StartRun] = []
        self.agents_changed = False

    def expect(self, agents: Iterable[str], deadline: float) -> None:
        """After a restart: these agents get until ``deadline`` to come back."""
        self.awaiting = set(agents)
        self.deadline = deadline

    def agent_back(self, name: str) -> None:
        self.awaiting.discard(name)
        self.agents_changed = True

    def park(self, action: StartRun, agents: Iterable[str], now: float) -> bool:
        """Park ``action`` if it needs an agent that may still come back; True if parked."""
        if not self.awaiting:
            return False
        if now >= self.deadline:
            self.awaiting.clear()
            return False
        if not self.awaiting.intersection(agents):
            return False
        self.parked.append(action)
        return True

    def take(self, now: float) -> list[StartRun]:
        """The parked starts to perform again now: an agent came back, or time is up."""
        if not self.parked or not (self.agents_changed or now >= self.deadline):
            return []
        self.agents_changed = False
        parked, self.parked = self.parked, []
        return parked

    def floor(self) -> float | None:
        """The earliest slot parked: the watermark stays below it."""
        return min((a.scheduled_at for a in self.parked), default=None)
