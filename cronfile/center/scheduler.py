"""The scheduler: WHEN each job's slots happen and what to do with each, with no I/O.

The center feeds it the desired jobs and the time; it answers with actions (start a run,
record a slot that will not run, stop runs). Keeping the decisions here, free of processes
and files, is what lets the tests drive DST days, clock steps and every concurrency policy
with a fake clock.

Timing is a heap of due times, never a scan of all jobs per tick: with 10,000 jobs a tick
touches only the jobs that are due. Each job has at most one pending ``fire`` entry (its
next slot); a reload bumps a job's *generation*, which makes its old entries stale without
searching the heap for them.

Slots are identified by (job, scheduled time, target). A job's next slot is always computed
strictly after the last one it handled, so a wall clock that steps BACK never replays a slot;
a clock that steps FORWARD makes several slots due at once: the latest runs (subject to
``starting_deadline``) and the earlier ones are recorded ``missed`` as one bounded record.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime

from cronfile.schedules.firetimes import JobTimer
from cronfile.schedules.jobtimes import Timer, job_timer
from cronfile.schedules.model import (
    CatchUp,
    Concurrency,
    Job,
    JobKind,
    RunStatus,
    SkipIndex,
    Strategy,
    skip_index,
)

MAX_ENUMERATED_SLOTS = 10_000
"""A long outage of a per-second job is counted up to this many slots, then bounded."""


@dataclass(frozen=True)
class StartRun:
    job: Job
    scheduled_at: float
    attempt: int = 1
    reason: str = "schedule"
    target: str | None = None  # a retry goes back to the target that failed
    forbid_busy_targets: bool = False
    """``concurrency: forbid`` under ``all``/``shard`` while a previous run is in flight:
    skip the slot only on the targets still running it (the center knows which), so one
    stuck agent does not stop the job on every other."""


@dataclass(frozen=True)
class RecordSlot:
    """A slot that will not run, and why (one record, even for a range of slots)."""

    job: Job
    scheduled_at: float
    status: RunStatus
    reason: str
    count: int = 1
    last_scheduled_at: float | None = None
    attempt: int = 1


@dataclass(frozen=True)
class StopRuns:
    job: str
    reason: str


Action = StartRun | RecordSlot | StopRuns


@dataclass(slots=True)  # one per job: no __dict__ (25 MB less for 100,000 jobs)
class _JobState:
    job: Job
    timer: Timer | None
    generation: int
    last_slot: float | None = None
    armed_at: float | None = None  # slots after this belong to the fire path, not catch-up
    # Created on first use: most jobs never run concurrently or sit in a chain, and three
    # empty containers per job are ~50 MB at 100,000 jobs.
    running: set[str] | None = None
    deps_done: set[str] | None = None
    after_seen: dict[tuple[str, float], None] | None = None  # bounded, in order
    queued: _Queued | None = None  # concurrency: queue, the one start that waits
    skips: SkipIndex | None = None  # the job's calendars, looked up once per definition


@dataclass(frozen=True, slots=True)
class _Queued:
    """A start held back by ``concurrency: queue`` until the job's running run ends."""

    slot: float
    attempt: int
    reason: str
    target: str | None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def jitter_for(job: Job, slot: float) -> float:
    """A delay in [0, jitter) that is the same for a slot on every host and restart."""
    if job.jitter_s <= 0:
        return 0.0
    digest = hashlib.sha256(f"{job.name}\0{slot}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") / 2**64) * job.jitter_s


def _timer_for(schedules: tuple[str, ...], zone: str, job: str) -> JobTimer:
    """A job's timer; jobs with the same schedules and zone share one (a timer is immutable)
    unless H is used, which seeds the schedule with the job's name."""
    if any("H" in text for text in schedules):
        return JobTimer.for_job(schedules, zone, job)
    return _shared_timer(schedules, zone)


@functools.lru_cache(maxsize=65536)
def _shared_timer(schedules: tuple[str, ...], zone: str) -> JobTimer:
    return JobTimer.for_job(schedules, zone, "")


def latest_two(timer: Timer, floor: float, now: float) -> tuple[float | None, float | None]:
    """The latest slot in (floor, now] and the one before it (None when there is no such
    slot after ``floor``), found by searching back from ``now`` in doubling windows: cost
    grows with the log of the range, not with the number of slots in it."""
    width = 1.0
    while True:
        start = max(floor, now - width)
        t = timer.next_after(start)
        if t is not None and t <= now:
            before: float | None = None
            latest = t
            n = timer.next_after(t)
            while n is not None and n <= now:
                before, latest = latest, n
                n = timer.next_after(n)
            if before is not None or start <= floor:
                return before, latest
        elif start <= floor:
            return None, None
        width *= 2


class Scheduler:
    """Holds the schedule of every job; see the module docstring."""

    def __init__(self) -> None:
        self._jobs: dict[str, _JobState] = {}
        self._heap: list[tuple[float, int, str, str, int, float, int, str | None]] = []
        self._seq = itertools.count()
        self._generations = itertools.count(1)
        self._dependents: dict[str, set[str]] = {}  # job -> jobs that run `after` it
        self._delayed: list[tuple[float, int]] = []  # (slot, seq) of delayed starts
        self._delayed_live: set[int] = set()  # seqs of delayed starts still in the heap
        self._queued: dict[str, float] = {}  # job -> slot of its queued start (few jobs)

    # ------------------------------------------------------------------ desired state

    @property
    def jobs(self) -> dict[str, Job]:
        """A copy, name -> job (O(jobs): for status and tests, not for hot paths)."""
        return {name: s.job for name, s in self._jobs.items()}

    def has_job(self, name: str) -> bool:
        return name in self._jobs

    def job_names(self) -> list[str]:
        return list(self._jobs)

    def job(self, name: str) -> Job | None:
        state = self._jobs.get(name)
        return state.job if state else None

    def set_job(self, job: Job, now: float) -> None:
        """Add or replace a job; its next slot is computed from now (a changed job's
        pending entries become stale)."""
        old = self._jobs.get(job.name)
        timer = None
        if job.kind is JobKind.CRON and (job.schedules or job.run_at is not None):
            shared = _timer_for(job.schedules, job.timezone, job.name) if job.schedules else None
            timer = job_timer(job, shared)  # the shared timer itself unless run_at/active
        state = _JobState(job, timer, next(self._generations))
        if job.skip:
            state.skips = skip_index(job.skip, job.timezone)
        same_timing = old is not None and old.job.schedules == job.schedules \
            and old.job.timezone == job.timezone and old.job.run_at == job.run_at \
            and old.job.active == job.active
        if old is not None:
            state.running = old.running
            state.deps_done = old.deps_done
            state.after_seen = old.after_seen
            state.queued = old.queued  # it starts when the run ends, by the new definition
            state.last_slot = old.last_slot if same_timing else None
            self._unindex(old.job)
        self._jobs[job.name] = state
        for dep in job.after:
            self._dependents.setdefault(dep, set()).add(job.name)
        if old is not None:
            self._carry_delayed(old, state)
        # Unchanged timing continues from the last handled slot, so a slot that was due but
        # not yet ticked when the reload came is not skipped; new timing starts from now.
        state.armed_at = max(now, state.last_slot or now)
        self._schedule_next(state, state.last_slot if same_timing and state.last_slot else now)

    def _carry_delayed(self, old: _JobState, new: _JobState) -> None:
        """A reload must not drop a slot that already fired but waits to start (jitter,
        retry backoff, trigger delay): move those entries to the new generation."""
        if not self._delayed_live:
            return  # none waits: no scan of a heap of 100,000 entries per changed job
        for due, _seq, kind, name, generation, slot, attempt, target in list(self._heap):
            if name == old.job.name and generation == old.generation and kind != "fire":
                self._push(due, kind, new, slot, attempt, target)

    def remove_job(self, name: str) -> None:
        state = self._jobs.pop(name, None)  # its heap entries are stale from now on
        self._queued.pop(name, None)
        if state is not None:
            self._unindex(state.job)

    def _unindex(self, job: Job) -> None:
        for dep in job.after:
            self._dependents.get(dep, set()).discard(job.name)

    def _schedule_next(self, state: _JobState, after: float) -> None:
        if state.timer is None:
            return
        nxt = state.timer.next_after(after)
        if nxt is not None:
            self._push(nxt, "fire", state, nxt)

    def _push(self, due: float, kind: str, state: _JobState, slot: float, attempt: int = 1,
              target: str | None = None) -> None:
        seq = next(self._seq)
        heapq.heappush(self._heap, (due, seq, kind, state.job.name, state.generation,
                                    slot, attempt, target))
        if kind != "fire":
            heapq.heappush(self._delayed, (slot, seq))
            self._delayed_live.add(seq)

    def next_due(self) -> float | None:
        while self._heap:
            due, _, _, name, generation, *_ = self._heap[0]
            state = self._jobs.get(name)
            if state is not None and state.generation == generation:
                return due
            self._delayed_live.discard(heapq.heappop(self._heap)[1])
        return None

    def pending_start_floor(self) -> float | None:
        """The earliest slot whose run is delayed (jitter, retry, trigger delay): the
        center's watermark must not pass it, or a crash would lose that slot silently."""
        # A second heap holds only delayed starts; the ones already taken off the main heap
        # are dropped lazily here, so this is O(1) amortised rather than a scan of all jobs.
        while self._delayed and self._delayed[0][1] not in self._delayed_live:
            heapq.heappop(self._delayed)
        floor = self._delayed[0][0] if self._delayed else None
        if self._queued:  # a start waiting behind a run (concurrency: queue) is pending too
            queued = min(self._queued.values())
            floor = queued if floor is None else min(floor, queued)
        return floor

    def next_fires(self) -> dict[str, float]:
        """Each job's next scheduled slot, from the heap (O(heap), for metrics)."""
        out: dict[str, float] = {}
        for _due, _, kind, name, generation, slot, *_ in self._heap:
            state = self._jobs.get(name)
            if kind == "fire" and state is not None and state.generation == generation \
                    and (name not in out or slot < out[name]):
                out[name] = slot
        return out

    def last_slots(self) -> dict[str, float]:
        """Each job's last slot handled (fired or recorded)."""
        return {name: s.last_slot for name, s in self._jobs.items() if s.last_slot is not None}

    # ------------------------------------------------------------------ time passes

    def tick(self, now: float) -> list[Action]:
        """Everything due at ``now``, in due order."""
        actions: list[Action] = []
        while self._heap and self._heap[0][0] <= now:
            _, seq, kind, name, generation, slot, attempt, target = heapq.heappop(self._heap)
            self._delayed_live.discard(seq)
            state = self._jobs.get(name)
            if state is None or state.generation != generation:
                continue
            if kind == "fire":
                actions.extend(self._fire(state, slot, now))
            else:
                actions.extend(self._start(state, slot, now, attempt, kind, target))
        return actions

    def _fire(self, state: _JobState, slot: float, now: float) -> list[Action]:
        assert state.timer is not None
        actions: list[Action] = []
        missed_first: float | None = None
        missed_last = slot
        missed = 0
        nxt = state.timer.next_after(slot)
        bounded = False
        # Several slots due at once (clock stepped forward, loop stalled): keep the latest.
        while nxt is not None and nxt <= now:
            if missed_first is None:
                missed_first = slot
            missed += 1
            missed_last = slot
            slot = nxt
            if missed >= MAX_ENUMERATED_SLOTS:
                # Too many to enumerate: jump to the latest slot (the one that runs) and
                # count the rest as a lower bound.
                before, latest = latest_two(state.timer, slot, now)
                if latest is not None and latest > slot:
                    missed += 1
                    missed_last = before if before is not None and before > slot else slot
                    slot = latest
                    bounded = True
                nxt = state.timer.next_after(max(now, slot))
                break
            nxt = state.timer.next_after(slot)
        state.last_slot = slot
        if nxt is not None:
            self._push(nxt, "fire", state, nxt)
        if state.job.suspend:
            return actions
        if missed_first is not None:
            why = "a later slot was already due (clock step or stall)"
            if bounded:
                why += f"; at least {missed} slots (too many to count)"
            actions.append(RecordSlot(state.job, missed_first, RunStatus.MISSED, why,
                                      missed, missed_last))
        delay = jitter_for(state.job, slot)
        if delay > 0:
            self._push(slot + delay, "start", state, slot)
            return actions
        actions.extend(self._start(state, slot, now, 1, "schedule", None))
        return actions

    def _start(self, state: _JobState, slot: float, now: float, attempt: int, reason: str,
               target: str | None) -> list[Action]:
        job = state.job
        if reason == "start":
            reason = "schedule"
        if state.skips is not None and attempt == 1 and reason in ("schedule", "catch_up"):
            why = state.skips.why(slot)  # a holiday or a freeze: the slot does not run
            if why is not None:
                return [RecordSlot(job, slot, RunStatus.SKIPPED, why)]
        intended = slot + (jitter_for(job, slot) if reason == "schedule" else 0.0)
        deadline = job.starting_deadline_s
        if deadline is not None and now - intended > deadline and attempt == 1:
            return [RecordSlot(job, slot, RunStatus.MISSED,
                               f"could not start within starting_deadline ({deadline:g}s); "
                               f"{now - intended:.1f}s late")]
        if state.running and reason not in ("manual", "on_change"):
            if job.concurrency is Concurrency.FORBID and job.targets.strategy in (
                    Strategy.ALL, Strategy.SHARD) and not job.targets.is_local_only:
                return [StartRun(job, slot, attempt, reason, target, forbid_busy_targets=True)]
            if job.concurrency is Concurrency.FORBID:
                return [RecordSlot(job, slot, RunStatus.SKIPPED,
                                   "previous run still running (concurrency: forbid)")]
            if job.concurrency is Concurrency.REPLACE:
                return [StopRuns(job.name, "replaced by a newer slot (concurrency: replace)"),
                        StartRun(job, slot, attempt, reason, target)]
            if job.concurrency is Concurrency.QUEUE:
                return self._enqueue(state, slot, attempt, reason, target)
        return [StartRun(job, slot, attempt, reason, target)]

    def _enqueue(self, state: _JobState, slot: float, attempt: int, reason: str,
                 target: str | None) -> list[Action]:
        """Hold the start until the running run ends; one waits at most, so a backlog
        never builds up behind a run that hangs (the wait is bounded by one slot)."""
        waiting = state.queued
        if waiting is not None:
            return [RecordSlot(state.job, slot, RunStatus.SKIPPED,
                               "previous run still running and the slot of "
                               f"{_iso(waiting.slot)} already waits (concurrency: queue)",
                               attempt=attempt)]
        state.queued = _Queued(slot, attempt, reason, target)
        self._queued[state.job.name] = slot
        return []

    def _start_queued(self, state: _JobState, now: float) -> list[Action]:
        """The run the queued start waited for ended: start it now, unless it waited past
        its ``starting_deadline`` (then it is ``missed``, as any late start)."""
        waiting = state.queued
        if waiting is None or state.running:
            return []
        state.queued = None
        self._queued.pop(state.job.name, None)
        return self._start(state, waiting.slot, now, waiting.attempt, waiting.reason,
                           waiting.target)

    # ------------------------------------------------------------------ other ways to run

    def run_now(self, name: str, now: float, reason: str = "manual") -> list[Action]:
        """Start the job now whatever its concurrency policy (an operator asked, or
        ``on_change: restart`` replaces the run it just stopped)."""
        state = self._jobs[name]
        return [StartRun(state.job, now, 1, reason)]

    def trigger(self, event: str, now: float) -> list[str]:
        """Queue every job triggered by ``event``; returns their names."""
        names = []
        for state in self._jobs.values():
            trig = state.job.trigger
            if trig is not None and trig.event == event and not state.job.suspend \
                    and (state.job.active is None or state.job.active.allows(now)):
                self._push(now + trig.delay_s, "trigger", state, now + trig.delay_s)
                names.append(state.job.name)
        return sorted(names)

    def requeue_trigger(self, name: str, due: float) -> bool:
        """Queue again a triggered start that a previous center had pending (see
        ``Center._requeue_pending``); False when the job no longer runs on a trigger."""
        state = self._jobs.get(name)
        if state is None or state.job.trigger is None or state.job.suspend:
            return False
        self._push(due, "trigger", state, due)
        return True

    def handed_over(self, until: float) -> None:
        """A standby's ticks threw their actions away up to ``until``; the slots up to it
        belong to a new leader's catch-up from now on (SPEC §9 "Takeover"), not to the
        fire path, which has already passed them."""
        for state in self._jobs.values():
            if state.armed_at is not None:
                state.armed_at = max(state.armed_at, until)

    def catch_up(self, name: str, since: float, now: float, done: set[float]) -> list[Action]:
        """Slots in (since, now] while the center was down, minus those in the ledger
        (``done``): with ``catch_up: latest`` the latest runs once; the rest are one
        bounded ``missed`` record."""
        state = self._jobs.get(name)
        if state is None or state.timer is None or state.job.suspend:
            return []
        # Slots after the job was armed are already pending in the heap: covering them
        # here too would give one slot two outcomes (missed AND run).
        until = now if state.armed_at is None else min(now, state.armed_at)
        count = 0
        first = last = before_last = None
        t = state.timer.next_after(since)
        while t is not None and t <= until and count < MAX_ENUMERATED_SLOTS:
            if t not in done:
                count += 1
                first = t if first is None else first
                before_last, last = last, t
            t = state.timer.next_after(t)
        bounded = False
        if t is not None and t <= until and last is not None:
            # Too many to enumerate: the range ends at the real latest slot, the count is
            # a lower bound.
            before, latest = latest_two(state.timer, last, until)
            if latest is not None and latest > last:
                count += 1
                before_last = before if before is not None and before > last else last
                last = latest
                bounded = True
        if first is None or last is None:
            return []
        actions: list[Action] = []
        run_latest = state.job.catch_up is CatchUp.LATEST
        missed_last = before_last if run_latest else last
        missed = count - 1 if run_latest else count
        if missed and missed_last is not None:
            why = "the center was not running"
            if bounded:
                why += f"; at least {missed} slots (too many to count)"
            actions.append(RecordSlot(state.job, first, RunStatus.MISSED, why, missed, missed_last))
        if run_latest:
            actions.extend(self._start(state, last, now, 1, "catch_up", None))
        state.last_slot = max(state.last_slot or last, last)
        return actions

    # ------------------------------------------------------------------ runs report back

    def started(self, name: str, run_id: str) -> None:
        state = self._jobs.get(name)
        if state is not None:
            if state.running is None:
                state.running = set()
            state.running.add(run_id)

    def not_started(self, name: str, run_id: str) -> None:
        """Undo :meth:`started` for a run that was never sent (another center claimed it)."""
        state = self._jobs.get(name)
        if state is not None and state.running:
            state.running.discard(run_id)

    def is_running(self, name: str) -> bool:
        """Whether the job has a run in flight (or a start waiting for a place)."""
        state = self._jobs.get(name)
        return state is not None and bool(state.running)

    def forget_run(self, name: str, run_id: str, now: float) -> list[Action]:
        """``run_id`` no longer counts as running, with no outcome of its own (a start
        that waited for a place in its pool now runs under its real id): the job's
        queued start may go now."""
        state = self._jobs.get(name)
        if state is None or not state.running:
            return []
        state.running.discard(run_id)
        return self._start_queued(state, now)

    def finished(self, name: str, run_id: str, status: RunStatus, exit_code: int | None,
                 slot: float, attempt: int, target: str | None, now: float) -> list[Action]:
        """A run ended: maybe retry it, maybe start the jobs that come ``after`` it."""
        state = self._jobs.get(name)
        if state is None:
            return []
        if state.running:
            state.running.discard(run_id)
        job = state.job
        actions: list[Action] = self._start_queued(state, now)
        if job.retries.wanted_after(status, attempt, exit_code):
            self._push(now + job.retries.delay_before(attempt + 1), "retry", state, slot,
                       attempt + 1, target)
        if status is RunStatus.SUCCEEDED:
            actions.extend(self._after(name, slot, now))
        return actions

    def _after(self, done: str, slot: float, now: float) -> list[Action]:
        """Dependents of ``done`` whose every ``after`` job has now succeeded. One upstream
        slot counts once, however many of its targets succeed (``strategy: all``)."""
        actions: list[Action] = []
        for name in sorted(self._dependents.get(done, ())):
            state = self._jobs.get(name)
            if state is None or state.job.suspend or (
                    state.job.active is not None and not state.job.active.allows(now)):
                continue
            key = (done, slot)
            if state.after_seen is None:
                state.after_seen = {}
            if state.deps_done is None:
                state.deps_done = set()
            if key in state.after_seen:
                continue
            state.after_seen[key] = None
            while len(state.after_seen) > 1024:
                del state.after_seen[next(iter(state.after_seen))]
            state.deps_done.add(done)
            if state.deps_done >= set(state.job.after):
                state.deps_done.clear()
                actions.extend(self._start(state, now, now, 1, "after", None))
        return actions
