"""What a center does about the previous one: recover the ledger, re-queue, catch up.

Runs the previous center left in flight are recorded ``lost`` (agent runs get a lease to
report first), the slots it handled are excluded (once per slot), what it had queued but not
started is queued again, and the slots of the outage are recorded or run as each job's
``catch_up`` says. An HA takeover does the same for the last lease's span. The pure part is
:mod:`cronfile.center.recovery`; this module applies it to the running parts.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from cronfile.center.dispatch import Dispatcher
from cronfile.center.options import CenterOptions
from cronfile.center.outcomes import Outcomes
from cronfile.center.recovery import Recovery, RequeueTrigger, pending_starts, recover_summary
from cronfile.center.routing import Router
from cronfile.center.scheduler import Action, RecordSlot, Scheduler
from cronfile.clock import Clock
from cronfile.schedules.model import DesiredState, RunStatus, Strategy
from cronfile.state.applied import StateFileError, read_applied
from cronfile.state.checkpoint import LedgerSummary
from cronfile.state.ledger import Ledger
from cronfile.state.retention import check_retention, parse_retention

if TYPE_CHECKING:  # psycopg is imported only by a center started with --ha
    from cronfile.center.standby import HaCoordinator

SLOT_MEMORY_S = 6 * 3600.0
"""Handled slots are remembered this long for once-per-slot checks in memory (jitter and
deadlines are far shorter); the ledger keeps them for good."""


def retention_refusal(options: CenterOptions, state: DesiredState | None, now: float) -> str | None:
    """Why ``--retention`` is too short for the jobs this center will run (those loaded,
    else the last applied ones), if it is."""
    if state is None:
        with contextlib.suppress(StateFileError):
            state = read_applied(options.state)
    if state is None:
        return None
    return check_retention(parse_retention(options.retention), options.retention,
                           state.jobs.values(), now)


class Restart:
    def __init__(self, ledger: Ledger, clock: Clock, scheduler: Scheduler, router: Router,
                 dispatcher: Dispatcher, outcomes: Outcomes) -> None:
        self.ledger = ledger
        self.clock = clock
        self.scheduler = scheduler
        self.router = router
        self.dispatcher = dispatcher
        self.outcomes = outcomes
        self.history = LedgerSummary()  # what start-up needs from the ledger's history
        self.missed_until: dict[str, float] = {}  # per job: end of the last recorded missed range
        self._recovered = Recovery()  # what the ledger said at start, until requeued

    def recover_ledger(self) -> None:
        """Runs the previous center left in flight are ``lost``; remember handled slots.
        From the ledger's summary: nothing here reads old history."""
        found = recover_summary(self.history)
        self.dispatcher.done_slots |= found.done_slots
        self.missed_until.update(found.missed_until)
        last_success = self.outcomes.last_success
        for job, ended in found.last_success.items():
            last_success[job] = max(last_success.get(job, 0.0), ended)
        self.outcomes.awaiting_agents.update(found.awaiting_agents)
        self._recovered = found
        if found.lost:
            self.ledger.append_runs(found.lost)

    def requeue_pending(self, desired: DesiredState | None) -> None:
        """What the previous center had queued but not started when it stopped is queued
        again, at the time it was due (at once when that has passed): see
        :func:`~cronfile.center.recovery.pending_starts`. Anything older than the slot
        memory (6 h) is dropped: a retry or a triggered run days late would surprise more
        than help."""
        found, self._recovered = self._recovered, Recovery()
        triggered_jobs = desired is not None and any(
            job.trigger is not None for job in desired.jobs.values())
        # the triggered events of the last hours, from the ledger's summary
        events = self.history.triggered if triggered_jobs else ()
        for start in pending_starts(found, events, self.clock.time() - SLOT_MEMORY_S,
                                    self.scheduler.has_job):
            if isinstance(start, RequeueTrigger):
                self.scheduler.requeue_trigger(start.job, start.due)
            else:
                self.scheduler.finished(start.job, start.run_id, start.status, start.exit_code,
                                        start.slot, start.attempt, start.agent, start.ended)

    async def catch_up(self, since: float) -> None:
        """Record (or run, ``catch_up: latest``) the slots the previous center did not
        handle. Under ``all``/``shard`` a slot is handled only when every target has it: a
        center killed between the targets of one slot leaves the rest of it missing, and
        those targets get their own ``missed``."""
        now = self.clock.time()
        actions: list[Action] = []
        done_by_job: dict[str, dict[float, set[str]]] = {}
        for job_name, slot, agent in self.dispatcher.done_slots:
            done_by_job.setdefault(job_name, {}).setdefault(slot, set()).add(agent)
        for name in self.scheduler.job_names():
            job = self.scheduler.job(name)
            handled = done_by_job.get(name, {})
            # a center killed before its first watermark already recorded part of the outage
            job_since = max(since, self.missed_until.get(name, since))
            done = set(handled)
            if job is not None and job.targets.strategy in (Strategy.ALL, Strategy.SHARD) \
                    and not job.targets.is_local_only:
                expected = set(self.router.candidates(job))
                for slot, agents in sorted(handled.items()):
                    if job_since < slot <= now and not expected <= agents:
                        for agent in sorted(expected - agents):
                            self.dispatcher.record_slot(RecordSlot(
                                job, slot, RunStatus.MISSED,
                                "the center stopped before it recorded this target's start"),
                                agent=agent)
            actions.extend(self.scheduler.catch_up(name, job_since, now, done))
        if actions:
            await self.dispatcher.perform(actions, wait=False)

    async def take_over(self, ha: HaCoordinator) -> None:
        """Slots of the last lease's span may be the old leader's: what it claimed is done,
        the rest follows each job's catch_up, exactly as after a restart."""
        await ha.claimer.warm()
        since = self.clock.time() - ha.settings.lease_s - 2 * ha.settings.renew_interval_s
        for job, slot, target in await ha.claimed_since(since):
            self.dispatcher.done_slots.add((job, round(slot, 3), target))
        await self.catch_up(since)

    async def housekeeping(self, lease_s: float) -> None:
        """Once a minute: forget handled slots older than any start can be (the ledger
        keeps them; memory need not), and give up on agents that never came back."""
        began = self.clock.time()
        while True:
            await asyncio.sleep(min(60.0, lease_s))
            now = self.clock.time()
            horizon = now - SLOT_MEMORY_S
            dispatcher = self.dispatcher
            dispatcher.done_slots = {k for k in dispatcher.done_slots if k[1] >= horizon}
            if self.outcomes.awaiting_agents and now - began >= lease_s:
                self.outcomes.expire_awaiting(lease_s)
