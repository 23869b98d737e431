"""What one change of a zone's UTC offset does to a job's slots, in words a reviewer reads.

:mod:`cronfile.schedules.firetimes` decides when a job fires; this module only explains it
around one transition, for ``plan`` (the affected slot of each transition in the window)
and ``validate`` (a warning for fixed local times that fall into a gap or an overlap).
The local times it names are the expression's own matches in the skipped or repeated
range, and the instant a moved slot fires at is asked of
:class:`~cronfile.schedules.firetimes.JobTimer`, so the explanation cannot drift from what
the center does (the tests compare both).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronfile.schedules.cronexpr import CronSpec, Spec
from cronfile.schedules.durations import format_duration
from cronfile.schedules.firetimes import JobTimer, is_correction, next_local, timeline, to_datetime

_SHOWN = 3  # affected local times named before "and N more"
_COUNTED = 100  # affected local times counted at most (a per-second job has 3,600 in a gap)
_YEAR_S = 366 * 86400


class Effect(enum.Enum):
    MOVED = "moved"
    """Spring forward, fixed-time job: the missing local times fire once, after the gap."""
    SKIPPED = "skipped"
    """Spring forward, interval job (or any job across a clock correction): they never fire."""
    ONCE = "once"
    """Fall back, fixed-time job: the repeated local times fire in the first pass only."""
    TWICE = "twice"
    """Fall back, interval job: real time goes on, the repeated times fire in both passes."""


@dataclass(frozen=True)
class Transition:
    """A change of UTC offset: at ``instant``, from ``offset_before`` to ``offset_after``."""

    zone: str
    instant: float
    offset_before: int
    offset_after: int

    @property
    def forward(self) -> bool:
        return self.offset_after > self.offset_before

    @property
    def correction(self) -> bool:
        return is_correction(self.offset_after - self.offset_before)

    def wall(self, offset: int) -> datetime:
        """The naive local wall time of the transition under ``offset``."""
        return datetime.fromtimestamp(self.instant + offset, UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class SlotEffect:
    """The local times of one schedule that the transition touches, and what happens."""

    transition: Transition
    effect: Effect
    local_times: tuple[datetime, ...]  # naive wall times, the first _COUNTED
    more: bool  # more than _COUNTED
    fires_at: float | None = None  # MOVED: the instant the job fires instead

    def times_text(self) -> str:
        return _list_times(self.local_times, self.more)

    def text(self) -> str:
        """``02:30 → 03:00 that day (02:30 does not exist)`` and the like (for ``plan``)."""
        t = self.transition
        times = self.times_text()
        if self.effect is Effect.MOVED and self.fires_at is not None:
            instead = _clock(to_datetime(self.fires_at, t.zone).replace(tzinfo=None))
            if self.many:
                return f"{times} {_ARROW} {instead} that day, one run (they do not exist)"
            return f"{times} {_ARROW} {instead} that day ({times} does not exist)"
        if self.effect is Effect.SKIPPED and t.correction:
            delta = format_duration(abs(t.offset_after - t.offset_before))
            return (f"clock correction (forward {delta}, not daylight saving): local times "
                    f"from {t.wall(t.offset_before):%Y-%m-%d %H:%M} to "
                    f"{t.wall(t.offset_after):%Y-%m-%d %H:%M} do not exist; {times} skipped")
        if self.effect is Effect.SKIPPED:
            return (f"{times} {'do' if self.many else 'does'} not exist that day: skipped "
                    "(interval jobs follow elapsed time)")
        first, second = _zone_names(t)
        if self.effect is Effect.ONCE:
            return (f"{times} {'fire once each' if self.many else 'fires once'} (in the first "
                    f"pass, {first}; not again in {second})")
        return (f"{times} {'happen' if self.many else 'happens'} twice: fires in both passes "
                f"({first} and {second})")

    @property
    def many(self) -> bool:
        return len(self.local_times) > 1 or self.more


_ARROW = "→"


def _clock(t: datetime) -> str:
    return f"{t:%H:%M:%S}" if t.second else f"{t:%H:%M}"


def _list_times(times: tuple[datetime, ...], more: bool) -> str:
    shown = [_clock(t) for t in times[:_SHOWN]]
    rest = len(times) - len(shown)
    if more or rest > 0:
        return ", ".join(shown) + (" and more" if more else f" and {rest} more")
    return " and ".join(shown) if len(shown) == 2 else ", ".join(shown)


def _zone_names(t: Transition) -> tuple[str, str]:
    before = to_datetime(t.instant - 1, t.zone).tzname() or "before"
    after = to_datetime(t.instant, t.zone).tzname() or "after"
    return before, after


def effect_on(spec: Spec, transition: Transition) -> SlotEffect | None:
    """What ``transition`` does to ``spec``'s slots, or None when no slot is touched
    (``@every`` and cron times outside the skipped or repeated local range)."""
    if not isinstance(spec, CronSpec):
        return None  # @every follows elapsed time, whatever the clock says
    t = transition
    low, high = sorted((t.offset_before, t.offset_after))
    start, end = t.wall(low), t.wall(high)  # the local range that is skipped or repeated
    if not _may_match(spec, start, end):
        return None
    times: list[datetime] = []
    found = next_local(spec, start, inclusive=True)
    while found is not None and found < end and len(times) <= _COUNTED:
        times.append(found)
        found = next_local(spec, found, inclusive=False)
    if not times:
        return None
    more = len(times) > _COUNTED
    shown = tuple(times[:_COUNTED])
    if t.forward:
        if t.correction or not spec.fixed_time:
            return SlotEffect(t, Effect.SKIPPED, shown, more)
        fires_at = JobTimer((spec,), t.zone).next_after(t.instant - 1)
        return SlotEffect(t, Effect.MOVED, shown, more, fires_at)
    return SlotEffect(t, Effect.ONCE if spec.fixed_time else Effect.TWICE, shown, more)


def _may_match(spec: CronSpec, start: datetime, end: datetime) -> bool:
    """False when no hour of [start, end) is one of the spec's (the usual answer: most jobs
    run at other hours than the one that changes), before searching for matches."""
    if end - start >= timedelta(hours=23):
        return True
    hour, last = start.replace(minute=0, second=0), end - timedelta(microseconds=1)
    while hour <= last:
        if hour.hour in spec.hours and hour.month in spec.months:
            return True
        hour += timedelta(hours=1)
    return False


def transitions(zone: str, start: float, end: float) -> list[Transition]:
    """The offset changes of ``zone`` in [start, end)."""
    return [Transition(zone, float(at), before, after)
            for at, before, after in timeline(zone).transitions_between(start, end)]


def fixed_time_warnings(spec: Spec, zone: str, now: float) -> str:
    """For ``validate``: one warning naming the next gap and the next overlap of the coming
    year where a fixed local time of ``spec`` falls (interval jobs are not surprising
    there), or ``""``."""
    if not isinstance(spec, CronSpec) or not spec.fixed_time or zone == "UTC":
        return ""
    return _fixed_time_warning(spec, zone, int(now // 86400))


@functools.lru_cache(maxsize=4096)
def _fixed_time_warning(spec: CronSpec, zone: str, day: int) -> str:
    # Cached per (expression, zone, day): 10,000 jobs sharing "0 2 * * *" cost one check.
    start = day * 86400.0
    seen: set[Effect] = set()
    parts: list[str] = []
    for t in transitions(zone, start, start + _YEAR_S):
        found = None if t.correction else effect_on(spec, t)
        if found is None or found.effect in seen:
            continue
        seen.add(found.effect)
        delta = format_duration(abs(t.offset_after - t.offset_before))
        at = f"{t.wall(t.offset_before):%H:%M}"
        times = found.times_text()
        if found.effect is Effect.MOVED and found.fires_at is not None:
            instead = _clock(to_datetime(found.fires_at, zone).replace(tzinfo=None))
            parts.append(f"on {t.wall(t.offset_before):%Y-%m-%d} {times} "
                         f"{'do' if found.many else 'does'} not exist (clocks go forward "
                         f"{delta} at {at}): it fires once, at {instead}")
        elif found.effect is Effect.ONCE:
            parts.append(f"on {t.wall(t.offset_before):%Y-%m-%d} {times} "
                         f"{'happen' if found.many else 'happens'} twice (clocks go back "
                         f"{delta} at {at}): it fires once, in the first pass "
                         f"({_zone_names(t)[0]})")
    return f"daylight saving in {zone}: " + "; ".join(parts) if parts else ""
