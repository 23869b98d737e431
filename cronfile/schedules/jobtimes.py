"""When one JOB fires: its schedules, or its one-shot ``run_at``, inside its ``active``
window. The scheduler, ``next`` and ``plan`` all ask here, so they cannot disagree."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from cronfile.schedules.firetimes import JobTimer
from cronfile.schedules.model import Active, Job, JobKind


class Timer(Protocol):
    """Fire times strictly after an instant (epoch seconds)."""

    def next_after(self, after: float) -> float | None: ...


@dataclass(frozen=True, slots=True)
class OneShot:
    """``run_at``: one slot, ever."""

    at: float

    def next_after(self, after: float) -> float | None:
        return self.at if self.at > after else None


@dataclass(frozen=True, slots=True)
class Windowed:
    """A timer limited to ``active: {from, until}``."""

    inner: Timer
    active: Active

    def next_after(self, after: float) -> float | None:
        start = self.active.from_s
        if start is not None and after < start:
            after = start - 1e-6  # a slot exactly at `from` is inside
        t = self.inner.next_after(after)
        if t is None or (self.active.until_s is not None and t >= self.active.until_s):
            return None
        return t


def job_timer(job: Job, schedules: Timer | None = None) -> Timer | None:
    """The job's timer, None for jobs that never fire on time (triggers, chains, daemons).
    ``schedules``: a timer for ``job.schedules`` the caller already holds (shared)."""
    if job.kind is not JobKind.CRON:
        return None
    timer: Timer | None
    if job.run_at is not None:
        timer = OneShot(job.run_at)
    elif job.schedules:
        timer = schedules or JobTimer.for_job(job.schedules, job.timezone, job.name)
    else:
        return None
    return Windowed(timer, job.active) if job.active is not None else timer


def iter_after(timer: Timer, after: float) -> Iterator[float]:
    t: float | None = after
    while t is not None:
        t = timer.next_after(t)
        if t is not None:
            yield t


def times(timer: Timer, after: float, count: int) -> list[float]:
    out: list[float] = []
    for t in iter_after(timer, after):
        out.append(t)
        if len(out) >= count:
            break
    return out
