"""Fire times: THE function that says when a job runs, used by ``next``, ``plan`` and the center.

Daylight saving, per SPEC §2 and cronie's rule
----------------------------------------------
Time is split into *segments* of constant UTC offset between a zone's transitions. Inside a
segment local wall time advances with real time, so a plain cron search on naive local
times is exact. At a segment boundary:

* spring forward (offset grows): local times inside the gap never happen. A *fixed-time*
  job (``30 2 * * *``) that matched inside the gap fires ONCE at the first valid instant
  after it (the transition itself); an *interval* job (``*/15``) simply skips the gap,
  since its next slot by real elapsed time is after it. A jump of more than 3 hours is a
  clock correction, not daylight saving (cronie's rule): its slots are skipped by every job.
* fall back (offset shrinks): local times repeat. A fixed-time job fired during the first
  pass, so the search resumes after the repeated range (it fires ONCE); an interval job
  follows real time and fires in both passes.

croniter 7.0.0 evaluates in local time and converts each match, which is why it fires
``30 2 * * *`` twice on 2026-10-25 in Europe/Berlin; the segment walk cannot, by
construction, because no naive time is ever visited twice for a fixed-time job.

Speed: a search costs a few field lookups. Results are memoised per (expression, zone,
instant), so 10,000 jobs sharing ``*/5 * * * *`` in one zone cost one search per tick.
"""

from __future__ import annotations

import bisect
import calendar
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronfile.schedules.cronexpr import CronSpec, EverySpec, Spec, parse_schedule

_EPOCH = datetime(1970, 1, 1)
# How far a search looks ahead. 29 February can be 8 years away (2096 -> 2104) and a date
# on a given weekday 11 (1 February is a Monday in 2027, then in 2038): 28 covers both.
_SEARCH_YEARS = 28
_MIN_YEAR, _MAX_YEAR = 2, 9990  # datetime's range, minus room for the arithmetic
_LAST_INSTANT = datetime(_MAX_YEAR, 1, 1, tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- zones


@dataclass(frozen=True)
class Segment:
    """A span of real time [start, end) with one UTC offset; ``None`` ends are unbounded."""

    start: float | None
    end: float | None
    offset: int
    previous_offset: int | None


class ZoneTimeline:
    """The transitions of one zone, found by probing ``utcoffset`` and cached per year.

    zoneinfo has no public list of transitions; probing once a day and bisecting to the
    second finds every transition that is more than a day away from the next, which all
    real zones satisfy. The scanned years always form one contiguous range, so "no
    transition between here and the next one found" is never an artefact of a year that
    was skipped.
    """

    _PROBE_S = 86400
    _LOOKAHEAD_YEARS = 30  # past the last transition the offset is fixed (tzdata's rule)

    def __init__(self, name: str) -> None:
        self.zone = ZoneInfo(name)
        self._transitions: list[int] = []  # epoch seconds where a new offset begins
        self._first_year = 0  # scanned: [_first_year, _last_year]; none when first > last
        self._last_year = -1
        # The segment found last and until when it may be reused: nearly every question
        # (100,000 jobs' next fire times at start, a burst of due jobs) falls inside it.
        # One tuple, replaced whole: threads (a reload, a plan) may ask at the same time.
        self._last: tuple[Segment, float] | None = None

    def offset_at(self, ts: float) -> int:
        off = datetime.fromtimestamp(ts, self.zone).utcoffset()
        return int(off.total_seconds()) if off is not None else 0

    def _scan_year(self, year: int) -> list[int]:
        start = int(datetime(year, 1, 1, tzinfo=UTC).timestamp())
        end = int(datetime(year + 1, 1, 1, tzinfo=UTC).timestamp())
        found = []
        previous = self.offset_at(start)
        t = start
        while t < end:
            nxt = min(t + self._PROBE_S, end)
            current = self.offset_at(nxt)
            if current != previous:
                lo, hi = t, nxt  # offset(lo) == previous, offset(hi) == current
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self.offset_at(mid) == previous:
                        lo = mid
                    else:
                        hi = mid
                found.append(hi)
                previous = current
            t = nxt
        return found

    def _cover(self, first: int, last: int) -> None:
        """Make sure every transition in the years [first, last] is known."""
        first, last = max(first, _MIN_YEAR), min(last, _MAX_YEAR)
        if self._first_year > self._last_year:  # nothing scanned yet
            self._first_year, self._last_year = first, first - 1
        added = False
        while first < self._first_year:
            self._first_year -= 1
            self._transitions.extend(self._scan_year(self._first_year))
            added = True
        while last > self._last_year:
            self._last_year += 1
            self._transitions.extend(self._scan_year(self._last_year))
            added = True
        if added:
            self._transitions = sorted(set(self._transitions))

    def segment(self, ts: float) -> Segment:
        last = self._last
        if last is not None and ts < last[1] and (last[0].start is None or last[0].start <= ts):
            return last[0]
        found = self._find_segment(ts)
        # Without a known end, the segment is only known to last through the years scanned.
        valid_until = found.end if found.end is not None else \
            datetime(min(self._last_year, _MAX_YEAR), 1, 1, tzinfo=UTC).timestamp()
        self._last = (found, valid_until)
        return found

    def _find_segment(self, ts: float) -> Segment:
        year = datetime.fromtimestamp(ts, UTC).year
        self._cover(year - 1, year + 1)
        i = bisect.bisect_right(self._transitions, ts)
        start = self._transitions[i - 1] if i > 0 else None
        end: float | None = None
        if i < len(self._transitions):
            end = self._transitions[i]
        elif self._last_year < year + self._LOOKAHEAD_YEARS:
            # The next transition may be years out (a zone that paused DST): look further.
            self._cover(year - 1, year + self._LOOKAHEAD_YEARS)
            i2 = bisect.bisect_right(self._transitions, ts)
            end = self._transitions[i2] if i2 < len(self._transitions) else None
        previous = self.offset_at(start - 1) if start is not None else None
        return Segment(start, end, self.offset_at(ts), previous)

    def transitions_between(self, start: float, end: float) -> list[tuple[int, int, int]]:
        """(instant, offset before, offset after) for each transition in [start, end)."""
        self._cover(datetime.fromtimestamp(start, UTC).year - 1,
                    datetime.fromtimestamp(end, UTC).year + 1)
        lo = bisect.bisect_left(self._transitions, start)
        hi = bisect.bisect_left(self._transitions, end)
        return [(t, self.offset_at(t - 1), self.offset_at(t)) for t in self._transitions[lo:hi]]


@functools.lru_cache(maxsize=1024)
def timeline(zone: str) -> ZoneTimeline:
    """The shared timeline of a zone (raises ZoneInfoNotFoundError for unknown names)."""
    return ZoneTimeline(zone)


# --------------------------------------------------------------------------- cron search


def _naive_seconds(dt: datetime) -> int:
    return int((dt - _EPOCH).total_seconds())


def _naive(seconds: float) -> datetime:
    return _EPOCH + timedelta(seconds=seconds)


def _first_at_least(values: tuple[int, ...], x: int) -> int | None:
    i = bisect.bisect_left(values, x)
    return values[i] if i < len(values) else None


def _day_matches(spec: CronSpec, t: datetime) -> bool:
    dom_ok = t.day in spec.days
    dow_ok = (t.weekday() + 1) % 7 in spec.weekdays
    if spec.dom_restricted and spec.dow_restricted:
        return dom_ok or dow_ok
    return dom_ok and dow_ok


def _next_candidate_day(spec: CronSpec, t: datetime) -> datetime:
    """Midnight of the first day after ``t``'s that can match ``spec`` (the caller checks
    it again): a monthly or weekly job jumps there instead of trying every day between."""
    midnight = datetime(t.year, t.month, t.day)
    by_weekday: datetime | None = None
    if spec.dow_restricted:
        today = (t.weekday() + 1) % 7  # 0 = Sunday, as in spec.weekdays
        ahead = min((w - today - 1) % 7 + 1 for w in spec.weekdays)
        by_weekday = midnight + timedelta(days=ahead)
        if not spec.dom_restricted:
            return by_weekday
    day = _first_at_least(spec.days, t.day + 1)
    if day is not None and day <= calendar.monthrange(t.year, t.month)[1]:
        by_date = midnight.replace(day=day)
    else:  # the month loop moves on from the first of the next month
        by_date = midnight.replace(day=1) + timedelta(days=32)
        by_date = by_date.replace(day=1)
    return by_date if by_weekday is None else min(by_date, by_weekday)


def next_local(spec: CronSpec, start: datetime, inclusive: bool) -> datetime | None:
    """The first naive local time >= (or >) ``start`` matching ``spec``, ignoring zones."""
    step = timedelta(seconds=1) if spec.has_seconds else timedelta(minutes=1)
    t = start.replace(microsecond=0)
    if not spec.has_seconds:
        t = t.replace(second=0)
    if t < start or (not inclusive and t == start):
        t += step
    limit_year = min(start.year + _SEARCH_YEARS, _MAX_YEAR)
    while t.year <= limit_year:
        if t.month not in spec.months:
            month = _first_at_least(spec.months, t.month + 1)
            t = datetime(t.year, month, 1) if month else datetime(t.year + 1, spec.months[0], 1)
            continue
        if not _day_matches(spec, t):
            t = _next_candidate_day(spec, t)
            continue
        if t.hour not in spec.hours:
            hour = _first_at_least(spec.hours, t.hour + 1)
            t = (t.replace(hour=hour, minute=0, second=0) if hour is not None
                 else datetime(t.year, t.month, t.day) + timedelta(days=1))
            continue
        if t.minute not in spec.minutes:
            minute = _first_at_least(spec.minutes, t.minute + 1)
            t = (t.replace(minute=minute, second=0) if minute is not None
                 else t.replace(minute=0, second=0) + timedelta(hours=1))
            continue
        if t.second not in spec.seconds:
            second = _first_at_least(spec.seconds, t.second + 1)
            t = (t.replace(second=second) if second is not None
                 else t.replace(second=0) + timedelta(minutes=1))
            continue
        return t
    return None


def _next_cron(spec: CronSpec, zone: str, after: float) -> float | None:
    line = timeline(zone)
    seg = line.segment(after)
    naive_from: float = math.floor(after) + seg.offset
    inclusive = False
    if (spec.fixed_time and seg.previous_offset is not None and seg.start is not None
            and seg.previous_offset > seg.offset):
        floor = seg.start + seg.previous_offset  # end of the repeated local range
        if naive_from < floor:
            naive_from, inclusive = floor, True
    for _ in range(64):  # each pass crosses one transition; 64 are ~30 years of DST
        found = next_local(spec, _naive(naive_from), inclusive)
        if found is None:
            return None
        local = _naive_seconds(found)
        if seg.end is None or local - seg.offset < seg.end:
            return float(local - seg.offset)
        boundary = seg.end
        nxt = line.segment(boundary)
        if nxt.offset > seg.offset:  # spring forward: [boundary+old, boundary+new) is a gap
            if (local < boundary + nxt.offset and spec.fixed_time
                    and not is_correction(nxt.offset - seg.offset)):
                return float(boundary)
            naive_from = boundary + nxt.offset
        else:  # fall back: a fixed-time job does not revisit the repeated range
            naive_from = boundary + (seg.offset if spec.fixed_time else nxt.offset)
        inclusive = True
        seg = nxt
    return None


# cronie's rule: a change of the clock by more than 3 hours is a correction (Pacific/Apia
# skipping 2011-12-30), not daylight saving: the skipped slots are not run after it.
CORRECTION_S = 3 * 3600


def is_correction(delta_s: int) -> bool:
    """True when an offset change of ``delta_s`` seconds is a clock correction, not DST."""
    return abs(delta_s) > CORRECTION_S


def _next_every(spec: EverySpec, after: float) -> float:
    n = math.floor(after / spec.interval_s) + 1
    return n * spec.interval_s


# Jobs that share a schedule and zone ask for the same instant together (at start, in a
# burst of due jobs): a small memo answers them once. Larger would only hold memory (at
# 100,000 jobs, 65,536 entries were ~15 MB) for instants nobody asks about again.
@functools.lru_cache(maxsize=8192)
def _next_cached(spec: Spec, zone: str, after: float) -> float | None:
    try:
        found = _next_every(spec, after) if isinstance(spec, EverySpec) else _next_cron(spec, zone, after)
    except (OverflowError, ValueError, OSError):  # beyond the years datetime can represent
        return None
    return found if found is not None and found < _LAST_INSTANT else None


# --------------------------------------------------------------------------- public API


@functools.lru_cache(maxsize=65536)
def compile_schedule(text: str, seed: str = "") -> Spec:
    """Parse and memoise; ``seed`` only matters (and only keys the cache) when H is used."""
    return parse_schedule(text, seed)


def spec_for(text: str, job: str) -> Spec:
    return compile_schedule(text, job if "H" in text else "")


@dataclass(frozen=True, slots=True)
class JobTimer:
    """When one job fires: the union of its schedules, in its zone."""

    specs: tuple[Spec, ...]
    zone: str

    @classmethod
    def for_job(cls, schedules: tuple[str, ...], zone: str, job: str) -> JobTimer:
        return cls(tuple(spec_for(s, job) for s in schedules), zone)

    def next_after(self, after: float) -> float | None:
        """The first fire time strictly after ``after`` (epoch seconds), or None."""
        best: float | None = None
        for spec in self.specs:
            t = _next_cached(spec, self.zone, after)
            if t is not None and (best is None or t < best):
                best = t
        return best

    def iter_after(self, after: float) -> Iterator[float]:
        t: float | None = after
        while t is not None:
            t = self.next_after(t)
            if t is not None:
                yield t

    def times(self, after: float, count: int) -> list[float]:
        out = []
        for t in self.iter_after(after):
            out.append(t)
            if len(out) >= count:
                break
        return out


def to_datetime(ts: float, zone: str = "UTC") -> datetime:
    return datetime.fromtimestamp(ts, ZoneInfo(zone))
