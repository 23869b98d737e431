"""A center's side of HA (SPEC §9): lead or stand by, claim before dispatch, recover.

The center asks :meth:`HaCoordinator.leading` before it acts on a tick (a standby ticks to
keep its timers current but throws every action away), and :meth:`HaCoordinator.claim`
before it writes a chunk's ``dispatched`` records: only the runs PostgreSQL granted are
written and sent. A takeover is then a restart in place: the center runs its catch-up over
the gap, and the slots the old leader claimed count as done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from cronfile.center.routing import Target
from cronfile.center.scheduler import StartRun
from cronfile.ha.claims import SLOT_TARGET, Claim, Claimer
from cronfile.ha.elector import Elector, HaSettings
from cronfile.ha.migrations import migrate
from cronfile.schedules.model import Strategy

__all__ = ["HaCoordinator", "claim_target"]

FAN_OUT = (Strategy.ALL, Strategy.SHARD)


def claim_target(action: StartRun, target: Target) -> str:
    """The third part of the claim key: the agent for all/shard jobs (one run per agent and
    slot), ``''`` for one/hash/failover/local (one run per slot, wherever it runs)."""
    return target.agent if action.job.targets.strategy in FAN_OUT else SLOT_TARGET


class HaCoordinator:
    """The elector and the claimer of one center; events go to the center's ledger."""

    def __init__(self, settings: HaSettings, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self.elector = Elector(settings, on_event)
        self.claimer = Claimer(settings.dsn, settings.name, settings.connect_timeout_s)

    def prepare(self) -> None:
        """Create or migrate the schema (blocking; called once, before the loop runs)."""
        with psycopg.connect(self.settings.dsn, autocommit=True,
                             connect_timeout=max(1, round(self.settings.connect_timeout_s))) as conn:
            migrate(conn)

    def leading(self) -> bool:
        return self.elector.is_leading()

    def view(self) -> dict[str, Any]:
        return self.elector.view().as_json()

    async def claim(self, starts: Sequence[tuple[StartRun, Target, str, dict[str, Any]]]) -> set[str]:
        """Claim (action, target, run_id, dispatched record) tuples; returns the run_ids won.

        Scheduled first attempts are keyed on their slot; retries and manual/triggered runs
        have no slot of their own (NULL) and are fenced by the lease and their run_id alone.
        """
        term = self.elector.term
        if term is None or not self.leading():
            return set()
        claims = []
        for action, target, run_id, record in starts:
            keyed = action.reason == "schedule" and action.attempt == 1
            slot = datetime.fromtimestamp(action.scheduled_at, UTC) if keyed else None
            claims.append(Claim(job=action.job.name, scheduled_at=slot,
                                target=claim_target(action, target), run_id=run_id,
                                dispatched=record))
        return await self.claimer.claim(term, claims, self.leading)

    async def claimed_since(self, since: float) -> list[tuple[str, float, str]]:
        """Slots claimed (by any leader) at or after ``since``: done, for catch-up."""
        async with await psycopg.AsyncConnection.connect(self.settings.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT job, extract(epoch FROM scheduled_at)::float8, target FROM cronfile_claims"
                " WHERE scheduled_at >= to_timestamp(%s)", (since,))
            return [(str(j), float(s), str(t)) for j, s, t in await cur.fetchall()]

    async def run(self) -> None:
        await self.elector.run()

    async def stop(self) -> None:
        await self.elector.stop(release=True)
        await self.claimer.close()

