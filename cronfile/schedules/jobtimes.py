"""When one JOB fires: its schedules, or its one-shot ``run_at``, inside its ``active``
window. The scheduler, ``next`` and ``plan`` all ask here, so they cannot disagree."""

from __future__ import annotations

import math
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
    """A timer limited to ``[from_s, until_s)`` (``active:``; open ends are infinite, so a
    slot costs two float comparisons more, not None checks)."""

    inner: Timer
    from_s: float = -math.inf
    until_s: float = math.inf

    @classmethod
    def of(cls, inner: Timer, active: Active) -> Windowed:
        return cls(inner, -math.inf if active.from_s is None else active.from_s,
                   math.inf if active.until_s is None else active.until_s)

    def next_after(self, after: float) -> float | None:
        if after < self.from_s:
            after = self.from_s - 1e-6  # a slot exactly at `from` is inside
        t = self.inner.next_after(after)
        return None if t is None or t >= self.until_s else t


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
    return Windowed.of(timer, job.active) if job.active is not None else timer


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
