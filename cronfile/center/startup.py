"""What a center does about the previous one: recover the ledger, re-queue, catch up.

Runs the previous center left in flight are recorded ``lost`` (agent runs get a lease to
report first), the slots it handled are excluded (once per slot), what it had queued but not
started is queued again, and the slots of the outage are recorded or run as each job's
``catch_up`` says. An HA takeover does the same from PostgreSQL (:meth:`Restart.take_over`):
an HA center recovers only when it leads. The pure part is :mod:`cronfile.center.recovery`;
this module applies it to the running parts.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from cronfile.center.dispatch import Dispatcher
from cronfile.center.journal import Journal
from cronfile.center.options import CenterOptions
from cronfile.center.outcomes import Outcomes
from cronfile.center.recovery import (
    Recovery,
    RequeueRetry,
    RequeueTrigger,
    pending_starts,
    recover,
    recover_summary,
)
from cronfile.center.routing import Router
from cronfile.center.scheduler import Action, RecordSlot, Scheduler
from cronfile.clock import Clock
from cronfile.schedules.model import DesiredState, RunStatus, Strategy
from cronfile.state.applied import StateFileError, read_applied
from cronfile.state.checkpoint import LedgerSummary
from cronfile.state.ledger import Ledger, fold_runs
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


def has_triggers(desired: DesiredState | None) -> bool:
    return desired is not None and any(job.trigger is not None for job in desired.jobs.values())


class Restart:
    def __init__(self, ledger: Ledger, clock: Clock, scheduler: Scheduler, router: Router,
                 dispatcher: Dispatcher, outcomes: Outcomes, journal: Journal,
                 lease_s: float) -> None:
        self.ledger = ledger
        self.clock = clock
        self.scheduler = scheduler
        self.router = router
        self.dispatcher = dispatcher
        self.outcomes = outcomes
        self.journal = journal
        self.lease_s = lease_s
        self.history = LedgerSummary()  # what start-up needs from the ledger's history
        self.missed_until: dict[str, float] = {}  # per job: end of the last recorded missed range
        self._recovered = Recovery()  # what the ledger said at start, until requeued
        # when the agents' runs in flight at the start (or the takeover) are given up on
        self.awaiting_until = clock.time() + lease_s
        # Set once the runs in flight of the previous center (or leader) are known: an HA
        # center learns them only when it leads (see :meth:`outcome_may_wait`).
        self.recovered_runs = asyncio.Event()
        self._cause = "restart"  # what the agents' runs were awaited after

    def recover_ledger(self) -> None:
        """Runs the previous center left in flight are ``lost``; remember handled slots.
        From the ledger's summary: nothing here reads old history."""
        found = recover_summary(self.history)
        self._learn(found)
        self._recovered = found
        if found.lost:
            self.ledger.append_runs(found.lost)
        self.recovered_runs.set()

    def _learn(self, found: Recovery) -> None:
        """What a restart or a takeover learned: handled slots, missed ranges, last
        successes, agents' runs to await."""
        self.dispatcher.done_slots |= found.done_slots
        for job, end in found.missed_until.items():
            self.missed_until[job] = max(self.missed_until.get(job, end), end)
        last_success = self.outcomes.last_success
        for job, ended in found.last_success.items():
            last_success[job] = max(last_success.get(job, 0.0), ended)
        self.outcomes.awaiting_agents.update(found.awaiting_agents)

    def requeue_pending(self, desired: DesiredState | None) -> None:
        """What the previous center had queued but not started when it stopped is queued
        again, at the time it was due (at once when that has passed): see
        :func:`~cronfile.center.recovery.pending_starts`. Anything older than the slot
        memory (6 h) is dropped: a retry or a triggered run days late would surprise more
        than help."""
        found, self._recovered = self._recovered, Recovery()
        # the triggered events of the last hours, from the ledger's summary
        events = self.history.triggered if has_triggers(desired) else ()
        self._requeue(pending_starts(found, events, self.clock.time() - SLOT_MEMORY_S,
                                     self.scheduler.has_job))

    def _requeue(self, pending: list[RequeueTrigger | RequeueRetry]) -> None:
        for start in pending:
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

    def handed_over(self, standby_tick: float | None) -> None:
        """HA, at the moment this center wins the lease (before any tick as the leader):
        what its ticks as a standby threw away (up to ``standby_tick``) is the takeover's
        catch-up, and the runs in flight are unknown until the takeover has read them."""
        if standby_tick is not None:
            self.scheduler.handed_over(standby_tick)
        self.recovered_runs.clear()
        self._cause = "takeover"

    async def take_over(self, ha: HaCoordinator, desired: DesiredState | None) -> None:
        """Recover from PostgreSQL exactly as a restart recovers from the JSONL (SPEC §9):
        the old leader's runs left in flight (``lost``, or awaited from their agents up to
        the lease), its retries and triggered starts pending (queued again at their time),
        and the gap's slots (run or recorded, per ``catch_up``)."""
        await ha.claimer.warm()
        now = self.clock.time()
        since = ha.gap_start(now)
        found = await ha.takeover_ledger(since, now - SLOT_MEMORY_S)
        if found is None:  # it stopped leading first: the next leader recovers
            return
        # A center that stepped down and leads again still holds its own runs.
        live = self.dispatcher.in_flight_ids() | self.journal.ending_ids()
        views = [v for v in fold_runs(found.runs) if v.get("run_id") not in live]
        recovery = recover(views, lambda view: (
            f"center {view.get('center')} (term {view.get('term')}) stopped leading "
            "while the run was in flight"))
        self._learn(recovery)
        last_success = self.outcomes.last_success
        for job, ended in found.last_success.items():
            last_success[job] = max(last_success.get(job, 0.0), ended)
        self.awaiting_until = now + self.lease_s
        records = self.journal.records
        for record in recovery.lost:
            records.add(record)
        records.flush()
        self.recovered_runs.set()
        self._requeue(pending_starts(recovery, found.triggered if has_triggers(desired) else (),
                                     now - SLOT_MEMORY_S, self.scheduler.has_job))
        await self.catch_up(since)
        records.flush()

    async def outcome_may_wait(self, patience_s: float) -> bool:
        """Before an agent's outcome of a run not in flight here is taken: an agent may
        deliver to a center that is about to lead (or just leads) and has not read the old
        leader's runs yet. False if they are still unknown after ``patience_s``."""
        if self.recovered_runs.is_set():
            return True
        try:
            await asyncio.wait_for(self.recovered_runs.wait(), patience_s)
        except TimeoutError:
            return False
        return True

    async def housekeeping(self, lease_s: float) -> None:
        """Once a minute: forget handled slots older than any start can be (the ledger
        keeps them; memory need not), and give up on agents that never came back."""
        while True:
            await asyncio.sleep(min(60.0, lease_s))
            now = self.clock.time()
            horizon = now - SLOT_MEMORY_S
            dispatcher = self.dispatcher
            dispatcher.done_slots = {k for k in dispatcher.done_slots if k[1] >= horizon}
            if self.outcomes.awaiting_agents and now >= self.awaiting_until:
                self.outcomes.expire_awaiting(lease_s, self._cause)
