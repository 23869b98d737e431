"""``cronfile backfill JOB --from T --to T``: run the past slots of a job that have no
record yet, oldest first, within the job's concurrency and pools.

Which slots: every fire time of the job in ``[from, to]`` (both ends included) that its
calendars (``skip``) and ``active`` window let it fire at, minus those the ledger already
has a record for in any state (a slot that ran, failed, was skipped or missed is never
re-run), minus those already waiting in an earlier backfill. A second backfill of the same
range therefore runs nothing.

How they run: each slot is a start with ``trigger: backfill`` and its own scheduled time.
A job with ``concurrency: allow`` gets them all at once (its pool, if any, still caps them);
any other job gets one at a time, each after the job's previous run (scheduled or
backfilled) has ended: backfilling never overlaps runs of a job that forbids it.

The slot arithmetic and the queue are here, without I/O; the center reads the ledger and
starts the runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cronfile.center.scheduler import StartRun
from cronfile.schedules.jobtimes import job_timer
from cronfile.schedules.model import Concurrency, Job

MAX_UNCONFIRMED_SLOTS = 10_000
"""A larger range needs ``--yes``: a wrong ``--from`` should not start a flood of runs."""
MAX_SLOTS = 1_000_000
"""Never more in one request, even with ``--yes`` (split the range)."""


class BackfillRefused(Exception):
    """The request cannot be carried out; the message says why."""


@dataclass(frozen=True, slots=True)
class SlotRange:
    """The fire times of a job in a range, and how many the calendars took out."""

    slots: tuple[float, ...]
    skipped_by_calendar: int


def slots_in_range(job: Job, start: float, end: float, limit: int) -> SlotRange:
    """The job's slots in ``[start, end]``, oldest first; refused past ``limit`` slots."""
    timer = job_timer(job)
    if timer is None:
        raise BackfillRefused(f"job {job.name!r} has no schedule or run_at: nothing to backfill")
    if end < start:
        raise BackfillRefused("--to is before --from")
    slots: list[float] = []
    skipped = 0
    t = timer.next_after(start - 1e-6)
    while t is not None and t <= end:
        if job.skipped_because(t) is not None:
            skipped += 1
        else:
            slots.append(t)
            if len(slots) > limit:
                raise BackfillRefused(_too_many(limit))
        t = timer.next_after(t)
    return SlotRange(tuple(slots), skipped)


def _too_many(limit: int) -> str:
    if limit < MAX_SLOTS:
        return (f"the range has more than {limit:,} slots: check --from/--to, or pass --yes "
                "to run them all")
    return f"the range has more than {limit:,} slots: split it into smaller ranges"


@dataclass
class BackfillQueue:
    """The slots each job still has to backfill, oldest first."""

    _pending: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, job: str, slots: tuple[float, ...]) -> None:
        queue = self._pending.setdefault(job, deque())
        merged = sorted({*queue, *slots})
        queue.clear()
        queue.extend(merged)

    def pending(self, job: str) -> set[float]:
        return set(self._pending.get(job, ()))

    def forget(self, job: str) -> None:
        """The job was removed: its slots will not be backfilled."""
        self._pending.pop(job, None)

    def jobs(self) -> list[str]:
        return list(self._pending)

    def next_starts(self, job: Job, running: bool) -> list[StartRun]:
        """The starts to make now: every pending slot for ``concurrency: allow``, else the
        oldest one when the job has no run (scheduled or backfilled) in flight."""
        queue = self._pending.get(job.name)
        if not queue:
            return []
        if job.concurrency is Concurrency.ALLOW:
            slots = list(queue)
            queue.clear()
        elif running:
            return []
        else:
            slots = [queue.popleft()]
        if not queue:
            del self._pending[job.name]
        return [StartRun(job, slot, reason="backfill") for slot in slots]
