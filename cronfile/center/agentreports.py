"""What agents report to the center, as the hub delivers it (the hub's ``AgentListener``).

Connections and disconnections are events (and refresh ``agents.json``; a start parked for
an agent that comes back goes now); an outcome is handed to the run's watcher or to
:class:`~cronfile.center.outcomes.Outcomes`, and returns once it is durable, which is when
the hub acks it to the agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cronfile.center.agents import write_agents_file
from cronfile.center.journal import Journal
from cronfile.center.outcomes import Outcomes
from cronfile.center.parking import Parking
from cronfile.center.startup import Restart
from cronfile.transports.hub import AgentHub
from cronfile.transports.remote import OutcomeDeferred

if TYPE_CHECKING:  # psycopg is imported only by a center started with --ha
    from cronfile.center.standby import HaCoordinator


class AgentReports:
    """The center's answers to its agents' connections and outcomes."""

    def __init__(self, journal: Journal, state_dir: Path, hub: Callable[[], AgentHub | None],
                 parking: Parking, wake: asyncio.Event, outcomes: Outcomes, restart: Restart,
                 ha: HaCoordinator | None, agent_lease_s: float) -> None:
        self.journal = journal
        self.state_dir = state_dir
        self.hub = hub
        self.parking = parking
        self.wake = wake
        self.outcomes = outcomes
        self.restart = restart
        self.ha = ha
        self.agent_lease_s = agent_lease_s

    def agent_connected(self, name: str) -> None:
        self.journal.event("agent_connected", agent=name)
        hub = self.hub()
        if hub is not None:
            write_agents_file(self.state_dir, hub)
        self.parking.agent_back(name)
        self.wake.set()

    def agent_disconnected(self, name: str) -> None:
        self.journal.event("agent_disconnected", agent=name)
        hub = self.hub()
        if hub is not None:
            write_agents_file(self.state_dir, hub)

    async def agent_outcome(self, run_id: str, agent: str, outcome: dict[str, Any]) -> None:
        """Every outcome an agent delivers; returns once it is durable (the hub acks it
        then). A run of this center: its handle resolved, its watcher writes the record.
        Otherwise see :meth:`~cronfile.center.outcomes.Outcomes.from_agent`."""
        if await self.journal.outcome_recorded(run_id):
            return
        if self.ha is not None:
            # An outcome of the old leader's run may reach this center before it leads or
            # has read that run from PostgreSQL: it waits (a lease and a half of each
            # kind), else it is not acked (the agent keeps it and delivers it again).
            patience = self.ha.settings.lease_s + self.agent_lease_s \
                + 2 * self.ha.settings.renew_interval_s
            if not await self.restart.outcome_may_wait(patience):
                raise OutcomeDeferred(f"run {run_id}: this center does not know the runs in "
                                      "flight yet (it does not lead)")
        self.outcomes.from_agent(run_id, agent, outcome)
