"""What an operator may ask of a running center (control socket and HTTP), and what HTTP reads.

:class:`CenterOperations` is the :class:`~cronfile.center.port.CenterPort` of a running
center: run a job now, trigger, apply, stop or wait for a run, backfill, and a snapshot
for metrics and the dashboard. It works on the center's parts, never on the daemon itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cronfile.center.backfill import (
    MAX_SLOTS,
    MAX_UNCONFIRMED_SLOTS,
    BackfillQueue,
    BackfillRefused,
    slots_in_range,
)
from cronfile.center.burst import Burst
from cronfile.center.counters import RunMetrics
from cronfile.center.dispatch import Dispatcher, Spawn
from cronfile.center.gitsync import GitFollower
from cronfile.center.journal import Journal
from cronfile.center.outcomes import Outcomes
from cronfile.center.port import AgentView, CenterSnapshot
from cronfile.center.reload import Reloader
from cronfile.center.scheduler import Scheduler
from cronfile.clock import Clock
from cronfile.schedules.model import DesiredState
from cronfile.state.ledger import iso
from cronfile.state.queries import recorded_slots
from cronfile.transports.hub import AgentHub

if TYPE_CHECKING:  # psycopg is imported only by a center started with --ha
    from cronfile.center.standby import HaCoordinator


class CenterOperations:
    """``desired()``: the applied state; ``revision()``: its revision fields; ``hub()``:
    the agent hub once it listens."""

    def __init__(self, *, state_dir: Path, clock: Clock, scheduler: Scheduler,
                 dispatcher: Dispatcher, journal: Journal, outcomes: Outcomes,
                 backfills: BackfillQueue, reloads: Reloader, git: GitFollower | None,
                 ha: HaCoordinator | None, metrics: RunMetrics, burst: Burst, spawn: Spawn,
                 desired: Callable[[], DesiredState | None],
                 revision: Callable[[], dict[str, Any]], hub: Callable[[], AgentHub | None],
                 wake: asyncio.Event) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.journal = journal
        self.outcomes = outcomes
        self.backfills = backfills
        self.reloads = reloads
        self.git = git
        self.ha = ha
        self.metrics = metrics
        self.burst = burst
        self.spawn = spawn
        self.desired = desired
        self.revision = revision
        self.hub = hub
        self.wake = wake

    # ------------------------------------------------------------------ what the operator asks

    def has_job(self, name: str) -> bool:
        return self.scheduler.has_job(name)

    async def run_job(self, name: str) -> list[dict[str, Any]]:
        return await self.dispatcher.perform(self.scheduler.run_now(name, self.clock.time()))

    async def backfill(self, name: str, start: float, end: float, dry_run: bool,
                       confirmed: bool) -> dict[str, Any]:
        """Queue the slots of ``name`` in ``[start, end]`` that have no record yet (see
        :mod:`cronfile.center.backfill`); with ``dry_run`` only say which."""
        job = self.scheduler.job(name)
        if job is None:
            raise BackfillRefused(f"no job named {name!r}")
        found = slots_in_range(job, start, end, MAX_SLOTS if confirmed else MAX_UNCONFIRMED_SLOTS)
        recorded = await asyncio.to_thread(recorded_slots, self.state_dir, name)
        recorded |= {slot for job_name, slot, _agent in self.dispatcher.done_slots
                     if job_name == name}
        waiting = self.backfills.pending(name)
        todo = tuple(t for t in found.slots if round(t, 3) not in recorded and t not in waiting)
        answer = {"job": name, "slots": [iso(t) for t in todo], "count": len(todo),
                  "already_recorded": sum(1 for t in found.slots if round(t, 3) in recorded),
                  "already_queued": sum(1 for t in found.slots if t in waiting),
                  "skipped_by_calendar": found.skipped_by_calendar, "dry_run": dry_run}
        if not dry_run and todo:
            self.backfills.add(name, todo)
            self.journal.event("backfill_queued", job=name, count=len(todo), first=iso(todo[0]),
                               last=iso(todo[-1]))
            self.dispatcher.pump_backfill(name)
        return answer

    def trigger(self, event: str) -> list[str]:
        now = self.clock.time()
        names = self.scheduler.trigger(event, now)
        self.wake.set()
        # When each start is due, exactly as queued: a restarted center re-queues the
        # ones that never started (see Restart.requeue_pending).
        due = {}
        for name in names:
            job = self.scheduler.job(name)
            if job is not None and job.trigger is not None:
                due[name] = iso(now + job.trigger.delay_s)
        self.journal.event("triggered", trigger_event=event, jobs=names, due=due)
        return names

    async def reload(self, revision: str | None = None) -> dict[str, Any]:
        """Re-read the source (fetching the branch first when following git): apply the
        difference, or keep the last good revision. ``revision``: a commit of the branch."""
        if self.git is not None:
            return await self.git.sync(revision)
        if revision is not None:
            return {"applied": False, "refused": "no_git", "errors": [
                "--revision: this center follows no git branch (it was started without --git "
                "URL); it applies its --schedules directory, so run `cronfile apply` without "
                "--revision"]}
        return await self.reloads.reload()

    def stop_run(self, run_id: str, requested_by: str) -> dict[str, Any]:
        """Stop one running run; its final record says ``killed``, with ``stopped_by`` and
        a ``reason`` naming who asked."""
        run = self.dispatcher.running.get(run_id)
        if run is None:
            return {"ok": False, "run_id": run_id, "error": f"run {run_id} is not running"}
        run.stop_reason = f"stopped by {requested_by}"
        run.base["stopped_by"] = requested_by
        self.journal.event("run_stop_requested", run_id=run_id, job=run.job, by=requested_by)
        self.spawn(run.handle.stop(run.stop_reason))
        return {"ok": True, "run_id": run_id, "job": run.job}

    async def wait_run(self, run_id: str, timeout: float) -> bool:
        if not await self.dispatcher.wait_ended(run_id, timeout):
            return False
        # a final record is queued for a few milliseconds, then written by the ledger's
        # writer thread: on disk before we answer (the writer runs submissions in order)
        with contextlib.suppress(OSError):
            self.journal.records.flush()
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self.journal.ledger.submit(lambda: None))
        return True

    # ------------------------------------------------------------------ what HTTP reads (port.py)

    def current_revision(self) -> dict[str, Any]:
        return self.revision()

    def applied_state(self) -> DesiredState | None:
        return self.desired()

    def wait_dispatch_idle(self, timeout: float) -> bool:
        return self.burst.wait_idle(timeout)

    def snapshot(self) -> CenterSnapshot:
        """O(jobs) copies on the loop (a few milliseconds at 10,000 jobs); the rendering
        that reads it runs in a thread."""
        running: dict[str, int] = {}
        for run in self.dispatcher.running.values():
            running[run.job] = running.get(run.job, 0) + 1
        hub, desired = self.hub(), self.desired()
        live = {a["name"]: a for a in hub.snapshot()} if hub is not None else {}
        declared = dict(desired.agents) if desired is not None else {}
        agents = []
        for name in list(declared) + [n for n in live if n not in declared]:
            conn = live.get(name)
            if conn is not None:
                agents.append(AgentView(name, True, conn["last_heartbeat"],
                                        conn["connected_since"], conn["labels"]))
            else:
                agents.append(AgentView(name, False, labels=dict(declared[name].labels)))
        rejection = self.reloads.last_rejection
        return CenterSnapshot(
            now=self.clock.time(), revision=self.revision(),
            last_rejection=dict(rejection) if rejection else None,
            jobs=tuple(desired.jobs.values()) if desired is not None else (),
            next_fire=self.scheduler.next_fires(), last_slot=self.scheduler.last_slots(),
            last_success=dict(self.outcomes.last_success), running=running,
            agents=tuple(agents),
            recent={name: tuple(strip) for name, strip in self.outcomes.recent.items()},
            git=self.git.state() if self.git is not None else None,
            ha=self.ha.view() if self.ha is not None else None)
