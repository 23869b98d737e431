"""Dispatch: from the scheduler's actions to runs in flight, and from their ends to records.

:class:`Dispatcher` owns the runs in flight (``running``) and the slots handled in memory
(``done_slots``, for once per slot). It routes each start (:class:`~cronfile.center.routing.Router`),
admits it (parked for a reconnecting agent, waiting for a pool or agent place), writes the
``dispatched`` records of a chunk durably BEFORE any of its runs starts (one write and one
fsync per chunk: group commit), starts each executor's runs back to back, and records each
run's end (deferred past a burst, so spawns go first).

Hot path: everything here runs once per run of a burst, so it allocates nothing it does not
need and goes through no extra indirection per run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cronfile.center.alerts import Notifier
from cronfile.center.backfill import BackfillQueue
from cronfile.center.burst import Burst
from cronfile.center.counters import RunMetrics
from cronfile.center.journal import Journal
from cronfile.center.outcomes import Outcomes
from cronfile.center.parking import Parking
from cronfile.center.pools import PlaceGate, Waiting
from cronfile.center.records import record_base, run_id_for, slot_record
from cronfile.center.routing import Router, Target
from cronfile.center.scheduler import Action, RecordSlot, Scheduler, StartRun, StopRuns, jitter_for
from cronfile.clock import Clock
from cronfile.schedules.model import Job, RunStatus
from cronfile.state.ledger import encode_record, encode_records, iso, utc_ts
from cronfile.state.runrecord import RunRecord
from cronfile.transports.executor import (
    Executor,
    HostUnavailable,
    RunHandle,
    RunOutcome,
    RunRefused,
    RunRequest,
)
from cronfile.transports.local import LocalExecutor

if TYPE_CHECKING:  # psycopg is imported only by a center started with --ha
    from cronfile.center.standby import HaCoordinator

log = logging.getLogger("cronfile.center")

DISPATCH_CHUNK = 128
DISPATCH_FIRST_CHUNK = 32
DISPATCH_REAP_FIRST = 1024
DISPATCH_REAP_EVERY = 512
"""A burst lets the loop reap finished runs after its first DISPATCH_REAP_FIRST spawns, then
after every DISPATCH_REAP_EVERY. Reaping costs the same in total wherever it happens, but
inside a burst it delays every spawn behind it, so a burst of up to 1,024 runs reaps after
its last spawn; a longer one reaps as it goes, since every run in flight holds descriptors
(its pipe, its pidfd) and each fork copies the descriptor table: measured here, spawns get
slower past ~2,000 descriptors (a 10,000-run burst: p99 1.35x the bare burst when reaping
every 1,024, 1.11x every 512)."""

Spawn = Callable[..., "asyncio.Task[Any]"]
"""The center's ``spawn(coro, critical=False, name=None)``: a child task it watches."""

PreparedRun = tuple[StartRun, Target, RunRequest, dict[str, Any]]
"""One run of a chunk: the start, where it goes, what is sent, its record base."""


@dataclass
class Running:
    """A run in flight: started, its outcome not recorded yet."""

    run_id: str
    job: str
    agent: str
    slot: float
    attempt: int
    handle: RunHandle
    base: dict[str, Any]
    stop_reason: str | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass
class Chunk:
    """Runs dispatched together: one write and one fsync (see :meth:`Dispatcher.dispatch`)."""

    runs: list[PreparedRun] = field(default_factory=list)
    data: bytes = b""  # its ``dispatched`` records, encoded for one write


def run_request(job: Job, run_id: str, slot: float | None, attempt: int,
                extra_env: tuple[tuple[str, str], ...]) -> RunRequest:
    """What an executor is asked to run."""
    return RunRequest(
        run_id=run_id, job=job.name, command=job.command,
        scheduled_at=datetime.fromtimestamp(slot, UTC) if slot else None,
        attempt=attempt, env=job.env + extra_env, workdir=job.workdir, run_as=job.run_as,
        timeout_s=job.timeout_s, output_keep=job.output_keep,
    )


def no_agent_reason(job: Job, only: str | None = None, attempt: int = 1) -> str:
    """Why a start found no target to go to."""
    if only is not None:
        return f"{'retry: ' if attempt > 1 else ''}agent {only} is not reachable"
    wanted = list(job.targets.agents) + [f"{k}={v}" for k, v in job.targets.labels]
    return f"no connected agent matches targets ({', '.join(wanted) or 'local'})"


def watch_max_runtime(run: Running, job: Job, running: dict[str, Running],
                      notifier: Notifier) -> asyncio.TimerHandle | None:
    """``expect.max_runtime``: alert once if ``run`` is still in ``running`` by then."""
    limit = job.expect.max_runtime_s
    if limit is None:
        return None

    def check() -> None:
        if run.run_id in running:
            notifier.alert(job, "max_runtime", f"still running after {limit:g}s", run.base)

    return asyncio.get_running_loop().call_later(limit, check)


async def claim_chunk(ha: HaCoordinator, chunk: Chunk,
                      not_claimed: Callable[[PreparedRun], None]) -> Chunk:
    """HA: keep only the runs PostgreSQL let this leader claim, with its term in their
    ``dispatched`` records (the claim and those records are one statement there); the
    others go to ``not_claimed``."""
    term = ha.elector.term
    wanted = [(action, target, request.run_id, RunRecord.dispatched(base, term))
              for action, target, request, base in chunk.runs]
    ts = utc_ts()  # one line per record in both ledgers, with the same time
    won = await ha.claim(wanted, ts)
    kept = Chunk()
    records = []
    for run, (_, _, run_id, record) in zip(chunk.runs, wanted, strict=True):
        if run_id in won:
            kept.runs.append(run)
            records.append(record)
        else:
            not_claimed(run)
    kept.data = b"".join(encode_record(r, ts) for r in records)
    return kept


class Dispatcher:
    """``revision()``: the applied revision, stamped on every record; ``stopping``: set
    once the center stops (no follow-up starts then); ``wake``: wakes the scheduler loop."""

    def __init__(self, *, clock: Clock, scheduler: Scheduler, router: Router,
                 local: LocalExecutor, journal: Journal, outcomes: Outcomes,
                 notifier: Notifier, metrics: RunMetrics, burst: Burst, places: PlaceGate,
                 parking: Parking, backfills: BackfillQueue, spawn: Spawn,
                 revision: Callable[[], dict[str, Any]], stopping: asyncio.Event,
                 wake: asyncio.Event) -> None:
        self.clock = clock
        self.scheduler = scheduler
        self.router = router
        self.local = local
        self.journal = journal
        self.records = journal.records
        self.outcomes = outcomes
        self.notifier = notifier
        self.metrics = metrics
        self.burst = burst
        self.places = places
        self.parking = parking
        self.backfills = backfills
        self.spawn = spawn
        self.revision = revision
        self.stopping = stopping
        self.wake = wake
        self.ha: HaCoordinator | None = None  # set by the center with --ha
        self.running: dict[str, Running] = {}
        self.done_slots: set[tuple[str, float, str]] = set()
        self._starting: dict[str, tuple[str, str]] = {}  # remote starts under way: (job, agent)
        self._deferred_ends: list[tuple[Running, StartRun, RunOutcome]] = []
        self._run_waiters: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------------ actions

    async def perform(self, actions: list[Action], wait: bool = True) -> list[dict[str, Any]]:
        """Carry out the scheduler's actions; starts are batched (one fsync per chunk).
        Returns what became of each start: ``{"run_id", "agent", "status"}`` with status
        ``started``, or the record of a slot that did not run (for ``cronfile run``).
        ``wait=False``: starts on remote hosts go on in the background (the scheduler loop
        must not wait for a dark agent) and their results are not returned."""
        results: list[dict[str, Any]] = []
        starts: list[tuple[StartRun, Target]] = []
        parking = self.parking
        for action in actions:
            if isinstance(action, RecordSlot):
                results.append(self.record_slot(action))
            elif isinstance(action, StopRuns):
                self.stop_runs(action.job, action.reason)
            elif isinstance(action, StartRun):
                targets = self.targets_for(action.job, action.target)
                if not targets and parking.park(
                        action, self.router.candidates(action.job)
                        if action.target is None else [action.target], self.clock.time()):
                    continue
                if not targets:
                    results.append(self.record_slot(RecordSlot(
                        action.job, action.scheduled_at, RunStatus.NO_AGENT,
                        no_agent_reason(action.job, action.target, action.attempt),
                        attempt=action.attempt), agent=action.target))
                    continue
                for target in targets:
                    key = (action.job.name, round(action.scheduled_at, 3), target.agent)
                    if action.attempt == 1 and action.reason == "schedule" and key in self.done_slots:
                        continue  # already in the ledger: once per slot
                    self.done_slots.add(key)
                    if target.executor is None and parking.park(
                            replace(action, target=target.agent), [target.agent],
                            self.clock.time()):
                        self.done_slots.discard(key)  # not handled yet: parked
                        continue
                    if target.executor is None:  # a target of all/shard that is not reachable
                        results.append(self.record_slot(RecordSlot(
                            action.job, action.scheduled_at, RunStatus.NO_AGENT, target.why,
                            attempt=action.attempt), agent=target.agent))
                        continue
                    if action.forbid_busy_targets and self._busy(action.job.name, target.agent):
                        results.append(self.record_slot(RecordSlot(
                            action.job, action.scheduled_at, RunStatus.SKIPPED,
                            "previous run still running on this target (concurrency: forbid)",
                            attempt=action.attempt), agent=target.agent))
                        continue
                    if self.places.needs_place(action.job, target.agent) \
                            and not self.places.take((action, target)):
                        results.append(self._wait_for_place(action, target))
                        continue
                    starts.append((action, target))
        if starts:
            results.extend(await self.dispatch(starts, wait))
        return results

    async def unpark(self, now: float) -> None:
        """Start the parked starts once their agent is back, or record them when it did
        not come back in time."""
        parked: list[Action] = list(self.parking.take(now))
        if parked:
            await self.perform(parked, wait=False)

    def in_flight_ids(self) -> set[str]:
        """The runs this center is starting or running (an HA takeover leaves them be)."""
        return set(self.running) | set(self._starting)

    def _busy(self, job: str, agent: str) -> bool:
        """A run of ``job`` on ``agent`` is in flight (being started, or running)."""
        return (job, agent) in self._starting.values() or any(
            r.job == job and r.agent == agent for r in self.running.values())

    def targets_for(self, job: Job, only: str | None = None) -> list[Target]:
        """Where a start goes; a retry (``only``) goes back to the target that failed and
        nowhere else: re-running another shard or another agent would be wrong."""
        if only is not None:
            return self.router.resolve_retry(job, only)
        return self.router.resolve(job)

    def record_slot(self, action: RecordSlot, agent: str | None = None) -> dict[str, Any]:
        """Record a slot that does not run (see :func:`~cronfile.center.records.slot_record`)."""
        record = slot_record(action, self.revision(), agent)
        self.outcomes.record(action.job.name, record)
        return record

    def stop_runs(self, job: str, reason: str) -> int:
        """Stop every run of ``job`` (recorded ``killed`` with ``reason``); how many."""
        runs = [r for r in self.running.values() if r.job == job]
        for run in runs:
            run.stop_reason = reason
            self.spawn(run.handle.stop(reason))
        return len(runs)

    def pump_backfill(self, name: str) -> None:
        """Start what the job's backfill may start now (its concurrency decides)."""
        job = self.scheduler.job(name)
        if job is None or self.stopping.is_set():
            return
        starts = self.backfills.next_starts(job, self.scheduler.is_running(name))
        if starts:
            self.spawn(self.perform(list(starts)))

    def _follow(self, follow: list[Action], job: str) -> None:
        """After a run's end: its follow-ups (retries, chains), else its backfill."""
        if follow and not self.stopping.is_set():
            self.spawn(self.perform(follow))
        elif not follow:
            self.pump_backfill(job)

    # ------------------------------------------------------------------ bursts and chunks

    def begin_burst(self) -> None:
        """A burst of starts is under way (see :class:`~cronfile.center.burst.Burst`)."""
        self.burst.begin()

    def end_burst(self) -> None:
        """The last overlapping burst is over: deferred outcomes and records go now."""
        if self.burst.end():
            self.end_deferred_runs()
            self.records.flush()

    async def dispatch(self, starts: list[tuple[StartRun, Target]],
                       wait: bool = True) -> list[dict[str, Any]]:
        """Dispatch in chunks. A chunk's ``dispatched`` records are written and fsynced
        (one write, one fsync) before any of its runs starts. A long burst lets the loop
        reap finished children as it goes (see :data:`DISPATCH_REAP_EVERY`). The first chunk
        is small, so the first runs start sooner."""
        chunks = [starts[:DISPATCH_FIRST_CHUNK]] + [
            starts[i:i + DISPATCH_CHUNK] for i in range(DISPATCH_FIRST_CHUNK, len(starts),
                                                        DISPATCH_CHUNK)]
        results: list[dict[str, Any]] = []
        self.begin_burst()
        try:
            unreaped, reap_after = 0, DISPATCH_REAP_FIRST
            # HA: the claim of the next chunk is in flight while this one spawns (one at a
            # time, on the claimer's one connection), so the round trips overlap the spawns.
            claiming = self._claim_ahead(chunks, 0)
            for index, part in enumerate(chunks):
                if claiming is None:
                    chunk = self._prepare_chunk(part)
                else:
                    chunk = await claiming
                    claiming = self._claim_ahead(chunks, index + 1)
                # durable BEFORE any of its runs starts (written on the writer thread)
                await self.journal.write_dispatched(chunk.data)
                results.extend(await self._start_chunk(chunk, wait))
                unreaped += len(chunk.runs)
                if unreaped >= reap_after and part is not chunks[-1]:
                    # two loop passes: the first starts watching the runs just spawned
                    # (LocalExecutor defers that), the second reaps those that ended
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                    unreaped, reap_after = 0, DISPATCH_REAP_EVERY
        finally:
            self.end_burst()
        return results

    def _claim_ahead(self, chunks: list[list[tuple[StartRun, Target]]],
                     index: int) -> asyncio.Future[Chunk] | None:
        if self.ha is None or index >= len(chunks):
            return None
        return asyncio.ensure_future(claim_chunk(self.ha, self._prepare_chunk(chunks[index]),
                                                 self._not_claimed))

    def _not_claimed(self, run: PreparedRun) -> None:
        """HA: another center claimed this run: it does not start here."""
        self.scheduler.not_started(run[0].job.name, run[2].run_id)
        self._give_place_back(run[0], run[1].agent)  # its pool place is not used

    def _prepare_chunk(self, starts: list[tuple[StartRun, Target]]) -> Chunk:
        """Everything a chunk needs before its runs can start: ids, record bases, requests,
        and its ``dispatched`` records encoded for one write. Its runs count as running from
        here on: a tick while a remote start is in flight must see them (concurrency:
        forbid)."""
        chunk = Chunk()
        records = []
        for action, target in starts:
            job = action.job
            run_id = run_id_for(job.name, action.scheduled_at, target.agent, action.attempt)
            if action.reason in ("manual", "trigger", "after", "on_change"):
                run_id = run_id_for(job.name, self.clock.time(), target.agent, action.attempt)
            base = record_base(job, action.scheduled_at, target.agent, target.transport,
                               action.attempt, run_id, self.revision())
            if action.reason != "schedule":
                base["trigger"] = action.reason  # what caused this run besides the schedule
            if target.why:
                base["route"] = target.why
            request = run_request(job, run_id, action.scheduled_at, action.attempt, target.env)
            if action.reason == "schedule" and action.attempt == 1:
                due = action.scheduled_at + jitter_for(job, action.scheduled_at)
                self.metrics.dispatched(self.clock.time() - due)
            chunk.runs.append((action, target, request, base))
            records.append(RunRecord.dispatched(base))
            if target.transport == "tcp":
                self.journal.expect_final(run_id)
            if target.executor is not self.local:
                self._starting[run_id] = (job.name, target.agent)
            self.scheduler.started(job.name, run_id)
        chunk.data = encode_records(records)
        return chunk

    async def _start_chunk(self, chunk: Chunk, wait: bool = True) -> list[dict[str, Any]]:
        """Start a chunk's runs. Each executor's group starts on its own: local runs here,
        back to back; remote ones (agents, SSH) in a task each, so that one dark host,
        whose start can take its executor's whole start timeout, holds nobody else's
        (with ``wait=False`` not even this call's)."""
        groups: dict[Executor, list[PreparedRun]] = {}
        for run in chunk.runs:
            assert run[1].executor is not None
            groups.setdefault(run[1].executor, []).append(run)
        remote = [self.spawn(self._start_group(executor, runs), name="start")
                  for executor, runs in groups.items() if executor is not self.local]
        results = await self._start_group(self.local, groups[self.local]) \
            if self.local in groups else []
        if wait and remote:
            for done in await asyncio.gather(*remote, return_exceptions=True):
                if isinstance(done, list):
                    results.extend(done)
        return results

    async def _start_group(self, executor: Executor, runs: list[PreparedRun]
                           ) -> list[dict[str, Any]]:
        """Start one executor's runs back to back; the bookkeeping of those that started
        (records, watchers) comes after the last spawn, so no run waits for another's."""
        results: list[dict[str, Any]] = []
        started: list[tuple[StartRun, Running]] = []
        try:
            handles = await executor.start_many([request for _, _, request, _ in runs])
        finally:
            for _, _, request, _ in runs:
                self._starting.pop(request.run_id, None)
        for (action, target, request, base), handle in zip(runs, handles, strict=True):
            if isinstance(handle, Exception):  # RunRefused, or anything else: recorded
                results.append(self._refused(action, target, request, base, handle))
                continue
            run = Running(request.run_id, action.job.name, target.agent,
                          action.scheduled_at, action.attempt, handle, base)
            self.running[run.run_id] = run
            started.append((action, run))
        for action, run in started:
            run.timer = watch_max_runtime(run, action.job, self.running, self.notifier)
            if run.handle.confirmed:  # never a ``started`` the host did not confirm
                self.records.add(RunRecord.started(run.base, run.handle.started_at.timestamp()))
            results.append({"run_id": run.run_id, "agent": run.agent, "status": "started"})
            self._watch_run(run, action)
        return results

    def _refused(self, action: StartRun, target: Target, request: RunRequest,
                 base: dict[str, Any], exc: Exception) -> dict[str, Any]:
        """A run that could not start: recorded failed (no ``started`` record), or
        ``no_agent`` when its host was not there to take it (an agent that disconnected
        between routing and sending: nothing failed, nothing to retry)."""
        if not isinstance(exc, RunRefused):
            log.exception("starting run %s of %s failed", request.run_id, request.job)
        reason = str(exc) if isinstance(exc, RunRefused) else f"{type(exc).__name__}: {exc}"
        status = RunStatus.NO_AGENT if isinstance(exc, HostUnavailable) else RunStatus.FAILED
        refused = RunRecord.without_outcome(base, status, reason,
                                            finished_at=iso(self.clock.time())).to_json()
        self.outcomes.record(action.job.name, refused)
        self._give_place_back(action, target.agent)
        follow = self.scheduler.finished(action.job.name, request.run_id, status,
                                         None, action.scheduled_at, action.attempt,
                                         target.agent, self.clock.time())
        if follow:
            self.spawn(self.perform(follow))
        else:
            self.pump_backfill(action.job.name)
        return refused

    # ------------------------------------------------------------------ runs that end

    def _watch_run(self, run: Running, action: StartRun) -> None:
        """Have :meth:`_run_ended` called with the run's outcome (deferred past a burst)."""
        run.handle.on_done(lambda outcome: self._run_ended_soon(run, action, outcome))

    def _run_ended_soon(self, run: Running, action: StartRun, outcome: RunOutcome) -> None:
        """While a burst is dispatched, its spawns go first: outcomes that arrive meanwhile
        wait for the end of the burst (:meth:`end_deferred_runs`; also before every tick,
        so the scheduler never decides on a run that has in fact ended)."""
        if self.burst.depth:
            self._deferred_ends.append((run, action, outcome))
        else:
            self._run_ended(run, action, outcome)

    def end_deferred_runs(self) -> None:
        ended, self._deferred_ends = self._deferred_ends, []
        for run, action, outcome in ended:
            self._run_ended(run, action, outcome)

    def _run_ended(self, run: Running, action: StartRun, outcome: RunOutcome) -> None:
        self.running.pop(run.run_id, None)
        if run.timer is not None:
            run.timer.cancel()
        if run.stop_reason and outcome.status is RunStatus.KILLED and not outcome.reason:
            outcome = replace(outcome, reason=run.stop_reason)
        self.outcomes.record(run.job, RunRecord.ended(run.base, outcome).to_json())
        self._give_place_back(action, run.agent)
        if outcome.status is RunStatus.LOST:
            self.outcomes.lost_bases[run.run_id] = run.base
        follow = self.scheduler.finished(run.job, run.run_id, outcome.status, outcome.exit_code,
                                         run.slot, run.attempt, run.agent, self.clock.time())
        self._follow(follow, run.job)
        waiter = self._run_waiters.pop(run.run_id, None)
        if waiter is not None:
            waiter.set()
        self.wake.set()

    async def wait_ended(self, run_id: str, timeout: float) -> bool:
        """Wait until ``run_id`` is no longer running; False on timeout."""
        if run_id in self.running:
            waiter = self._run_waiters.setdefault(run_id, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), timeout=timeout)
            except TimeoutError:
                return False
        return True

    # ------------------------------------------------------------------ pool and agent places

    def _wait_for_place(self, action: StartRun, target: Target) -> dict[str, Any]:
        """The start's pool or agent is full: it waits, and counts as a run of its job
        meanwhile (``concurrency: forbid`` skips the job's next slot as for a running one)."""
        waiting = self.places.wait((action, target), self.clock.time())
        self.scheduler.started(action.job.name, waiting.token)
        return {"job": action.job.name, "agent": target.agent, "status": "waiting",
                "reason": "waiting for a place (its pool or agent is full)"}

    def _give_place_back(self, action: StartRun, agent: str) -> None:
        """A run's outcome is known: its pool and agent places go to the oldest waiting
        starts that fit (dispatched at once)."""
        if not self.places.needs_place(action.job, agent):
            return
        admitted = self.places.release(action.job, agent)
        if admitted and not self.stopping.is_set():
            self.spawn(self._dispatch_admitted(admitted))

    async def _dispatch_admitted(self, admitted: list[Waiting]) -> None:
        """Dispatch starts that got their places; each stops counting as waiting once its
        real run counts (from ``_prepare_chunk`` on)."""
        try:
            await self.dispatch([waiting.start for waiting in admitted])
        finally:
            follow: list[Action] = []
            for waiting in admitted:
                follow.extend(self.scheduler.forget_run(waiting.job.name, waiting.token,
                                                        self.clock.time()))
            if follow and not self.stopping.is_set():
                await self.perform(follow)

    def expire_waiting(self, now: float) -> None:
        """Starts that waited for a place past their deadline: recorded ``missed``."""
        follow: list[Action] = []
        for waiting in self.places.expired(now):
            job = waiting.job
            reason = waiting.missed_reason(self.places.agent_caps.get(waiting.agent), iso)
            self.record_slot(RecordSlot(job, waiting.scheduled_at, RunStatus.MISSED, reason,
                                        attempt=waiting.start[0].attempt))
            follow.extend(self.scheduler.finished(
                job.name, waiting.token, RunStatus.MISSED, None, waiting.scheduled_at,
                waiting.start[0].attempt, waiting.agent, now))
        if follow:
            self.spawn(self.perform(follow))
        for name in self.backfills.jobs():
            self.pump_backfill(name)

