"""Retention (SPEC §8): how long the ledger keeps history, and which segments go.

Only whole sealed segments are removed, oldest first, and the pass stops at the first one
that must stay: one holding a record newer than the cutoff, one where a run still open began
(its outcome is yet to come and its ``dispatched`` record must stay with it), one the
checkpoint has not folded yet, or the newest segment of the log (its number is where the
next rotation continues).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cronfile.schedules.firetimes import JobTimer
from cronfile.schedules.model import CatchUp, Job, JobKind
from cronfile.state.segments import Segment

__all__ = ["DEFAULT_RETENTION", "RetentionError", "RetentionNeed", "check_retention",
           "expired_segments", "parse_retention", "retention_needs"]

DEFAULT_RETENTION = "90d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


class RetentionError(ValueError):
    """A ``--retention`` value that cannot be used; the message says why."""


def parse_retention(text: str) -> float | None:
    """``90d``, ``12h``, ``2w``... in seconds; ``forever`` is None (keep everything)."""
    if text.strip().lower() == "forever":
        return None
    match = _DURATION.match(text)
    if match is None:
        raise RetentionError(f"--retention {text!r}: expected a duration like 90d, 12h, 2w, "
                             "or 'forever'")
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds <= 0:
        raise RetentionError(f"--retention {text!r}: must be more than zero")
    return seconds


@dataclass(frozen=True, slots=True)
class RetentionNeed:
    """How far back one job needs the ledger, and why (for the refusal message)."""

    job: str
    seconds: float
    why: str


def expired_segments(segments: list[Segment], cutoff: str, open_seqs: set[int],
                     unfolded_from: int) -> list[Segment]:
    """The segments to remove now (oldest first) of one log's ``segments`` (oldest first)."""
    if not segments:
        return []
    newest = segments[-1].seq
    out = []
    for segment in segments:
        if (not segment.sealed or segment.hi is None or segment.hi >= cutoff[:19] + "Z"
                or segment.seq in open_seqs or segment.seq >= unfolded_from
                or segment.seq == newest):
            break
        out.append(segment)
    return out


def retention_needs(jobs: Iterable[Job], now: float) -> list[RetentionNeed]:
    """How far back each job needs its history, where that is more than the slot memory
    every center keeps anyway: ``expect.success_within`` (the last success must still be
    there), its retries (from the first attempt to the last) and ``catch_up: latest`` (the
    last slot before an outage, up to one period of the schedule back)."""
    needs = []
    for job in jobs:
        if job.expect.success_within_s:
            needs.append(RetentionNeed(job.name, job.expect.success_within_s,
                                       "expect.success_within"))
        if job.retries.max:
            reach = sum(job.retries.delay_before(a) for a in range(2, job.retries.max + 2))
            reach += (job.retries.max + 1) * (job.timeout_s or 0.0)
            needs.append(RetentionNeed(job.name, reach, "its retries"))
        if job.catch_up is CatchUp.LATEST and job.schedules and job.kind is JobKind.CRON:
            period = _longest_gap(job, now)
            if period:
                needs.append(RetentionNeed(job.name, period, "catch_up: latest"))
    return needs


def _longest_gap(job: Job, now: float, fires: int = 32) -> float:
    timer = JobTimer.for_job(job.schedules, job.timezone, job.name)
    gaps, previous = [], timer.next_after(now)
    for _ in range(fires):
        if previous is None:
            break
        following = timer.next_after(previous)
        if following is None:
            break
        gaps.append(following - previous)
        previous = following
    return max(gaps, default=0.0)


def check_retention(retention_s: float | None, retention_text: str, jobs: Iterable[Job],
                    now: float) -> str | None:
    """Why ``--retention`` is too short for these jobs (one line per job), or None."""
    if retention_s is None:
        return None
    short = [n for n in retention_needs(jobs, now) if n.seconds > retention_s]
    if not short:
        return None
    lines = [f"--retention {retention_text} is shorter than some jobs need the ledger:"]
    lines += [f"  job {n.job}: {n.why} reaches {format_duration(n.seconds)} back"
              for n in sorted(short, key=lambda n: (n.job, n.why))]
    lines.append("use a longer --retention (or 'forever')")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"
