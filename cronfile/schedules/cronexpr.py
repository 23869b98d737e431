"""Parsing schedule expressions into sets of allowed field values.

Supported, per SPEC §2: 5-field cron (minute hour day-of-month month day-of-week), 6-field
cron with SECONDS FIRST (Quartz, Dkron, node-cron), the nicknames, ``@every <duration>`` and
Jenkins' ``H`` (a stable per-job hash value). ``R`` (random) is refused on purpose: a
schedule that moves on every restart cannot be planned or reviewed.

The result is plain data (:class:`CronSpec`, :class:`EverySpec`); the arithmetic of fire
times, daylight saving included, lives in :mod:`cronfile.schedules.firetimes`.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import re
from dataclasses import dataclass, field

from cronfile.schedules.durations import parse_duration

NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTHS = {n.lower(): i for i, n in enumerate(calendar.month_abbr) if n}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (it holds a dict)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None
    hash_high: int | None = None  # H in day-of-month spreads over 1-28, as in Jenkins


_SECOND = _Field("second", 0, 59)
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DOM = _Field("day-of-month", 1, 31, hash_high=28)
_MONTH = _Field("month", 1, 12, _MONTHS)
_DOW = _Field("day-of-week", 0, 7, _DAYS, hash_high=6)


class ScheduleError(ValueError):
    """A schedule expression that cannot be used; the message says which field and why."""


@dataclass(frozen=True, slots=True)  # slots: one per distinct schedule, 100,000s of them
class CronSpec:
    """A cron expression as the sets of values each field allows.

    ``fixed_time`` follows cronie: a job whose minute and hour fields do not start with ``*``
    (or ``H/``) names a wall-clock time, so daylight-saving shifts move it rather than
    repeat or drop it; any other job is an interval job and follows real elapsed time.
    """

    text: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]  # 0 = Sunday
    dom_restricted: bool
    dow_restricted: bool
    fixed_time: bool
    has_seconds: bool
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        # Fire times are memoised per (spec, zone, instant): hashing six tuples on every
        # lookup cost more than the lookup saved, so the hash is computed once. Not the
        # text's hash alone: "H H * * *" is a different spec for each job (its seed), and
        # 20,000 equal hashes made every lookup compare against all of them.
        h = self._hash
        if h is None:
            h = hash((self.text, self.seconds, self.minutes, self.hours, self.days,
                      self.months, self.weekdays))
            object.__setattr__(self, "_hash", h)
        return h


@dataclass(frozen=True, slots=True)
class EverySpec:
    """``@every <duration>``: every ``interval_s`` seconds of real time, anchored at the Unix
    epoch so that a restart of the center never shifts the sequence."""

    text: str
    interval_s: float


Spec = CronSpec | EverySpec


def job_hash(seed: str, field_name: str) -> int:
    """A stable integer for (job, field): the same on every host, process and restart."""
    digest = hashlib.sha256(f"{seed}\0{field_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def parse_schedule(text: str, seed: str = "") -> Spec:
    """Parse one schedule expression; ``seed`` (the job name) fixes the values of ``H``."""
    if not isinstance(text, str):
        raise ScheduleError(f"a schedule is a string, not {type(text).__name__}")
    expr = " ".join(text.split())
    if not expr:
        raise ScheduleError("empty schedule")
    if expr.startswith("@"):
        word, _, rest = expr.partition(" ")
        if word == "@every":
            try:
                interval = parse_duration(rest)
            except ValueError as exc:
                raise ScheduleError(f"@every needs a duration: {exc}") from None
            if interval < 1:
                raise ScheduleError("@every needs an interval of at least 1s")
            return EverySpec(expr, interval)
        if word == "@reboot":
            raise ScheduleError("@reboot is not supported: use kind: daemon for a process "
                                "that starts with the host")
        if word not in NICKNAMES or rest:
            raise ScheduleError(f"unknown nickname {expr!r} (known: {', '.join(NICKNAMES)}, "
                                "@every <duration>)")
        return _parse_fields(expr, NICKNAMES[word].split(), seed)
    parts = expr.split(" ")
    if len(parts) not in (5, 6):
        raise ScheduleError(
            f"{len(parts)} fields in {expr!r}: use 5 (minute hour day month weekday) or 6 "
            "(second minute hour day month weekday)"
        )
    return _parse_fields(expr, parts, seed)


def _parse_fields(text: str, parts: list[str], seed: str) -> CronSpec:
    has_seconds = len(parts) == 6
    if not has_seconds:
        parts = ["0", *parts]
    specs = (_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW)
    values = [_parse_field(part, spec, seed) for part, spec in zip(parts, specs, strict=True)]
    weekdays = tuple(sorted({0 if d == 7 else d for d in values[5]}))
    # As in Vixie cron and cronie: a field that starts with * (even */2) is "unrestricted";
    # when both day fields are restricted a day matches if EITHER matches.
    dom_star = parts[3].startswith(("*", "?"))
    dow_star = parts[5].startswith(("*", "?"))
    minute_hour_star = any(p.startswith(("*", "H/")) for p in (parts[1], parts[2]))
    spec = CronSpec(
        text=text,
        seconds=values[0],
        minutes=values[1],
        hours=values[2],
        days=values[3],
        months=values[4],
        weekdays=weekdays,
        dom_restricted=not dom_star,
        dow_restricted=not dow_star,
        fixed_time=not minute_hour_star,
        has_seconds=has_seconds,
    )
    if never_fires(spec):
        raise ScheduleError(f"{text!r} never fires: no month in it has such a day")
    return spec


_RANGE = re.compile(r"^([0-9]+|[A-Za-z]{3})(?:-([0-9]+|[A-Za-z]{3}))?$")
# Quartz-only syntax (last day, nearest weekday, nth weekday), in any case and with names.
_QUARTZ = re.compile(r"^(?:L|LW|L-[0-9]+|(?:[0-9]+|[A-Z]{3})[LW]|(?:[0-9]+|[A-Z]{3})#[0-9]+)$",
                     re.IGNORECASE)
_HASH = re.compile(r"^H(?:\((\w+)-(\w+)\))?$")


def _parse_field(part: str, spec: _Field, seed: str) -> tuple[int, ...]:
    # Fields repeat across thousands of jobs ("*", "0", "1-5"); only H depends on the job.
    return _parse_field_cached(part, spec, seed if "H" in part else "")


@functools.lru_cache(maxsize=4096)
def _parse_field_cached(part: str, spec: _Field, seed: str) -> tuple[int, ...]:
    allowed: set[int] = set()
    for item in part.split(","):
        if not item:
            raise ScheduleError(f"empty list item in {spec.name} field {part!r}")
        allowed.update(_parse_item(item, spec, seed))
    return tuple(sorted(allowed))


def _parse_item(item: str, spec: _Field, seed: str) -> range | list[int]:
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or int(step_text) == 0:
            raise ScheduleError(f"bad step {step_text!r} in {spec.name} field {item!r}")
        step = int(step_text)
    if base == "R" or base.startswith("R("):
        raise ScheduleError(f"R (random) in the {spec.name} field is not supported: it would "
                            "change on every restart; use H for a stable spread")
    if base in ("*", "?"):
        if base == "?" and spec not in (_DOM, _DOW):
            raise ScheduleError(f"'?' is only allowed in day-of-month and day-of-week, not {spec.name}")
        high = 6 if spec is _DOW else spec.high
        return range(spec.low, high + 1, step)
    hashed = _HASH.match(base)
    if hashed:
        low, high = spec.low, spec.hash_high if spec.hash_high is not None else spec.high
        if hashed.group(1):
            low, high = _value(hashed.group(1), spec), _value(hashed.group(2), spec)
            if low > high:
                raise ScheduleError(f"H range {low}-{high} is backwards in the {spec.name} field")
        h = job_hash(seed, spec.name)
        if slash:
            start = low + h % min(step, high - low + 1)
            return range(start, high + 1, step)
        return [low + h % (high - low + 1)]
    match = _RANGE.match(base)
    if not match:
        if _QUARTZ.match(base):
            raise ScheduleError(f"{item!r}: L, W and # are not supported in the {spec.name} field")
        raise ScheduleError(f"cannot read {item!r} in the {spec.name} field")
    low = _value(match.group(1), spec)
    if match.group(2) is None:
        high = spec.high if slash else low
        if spec is _DOW and slash:
            high = 6
    else:
        high = _value(match.group(2), spec)
        if spec is _DOW and high == 0 and low > 0:
            high = 7  # cronie: Sunday as 0 at the end of a range (Sat-Sun, 5-0) is 7
    if low > high:
        raise ScheduleError(f"range {item!r} is backwards in the {spec.name} field")
    return range(low, high + 1, step)


def _value(token: str, spec: _Field) -> int:
    if token.isascii() and token.isdigit():
        number = int(token)
    elif spec.names and token.lower() in spec.names:
        number = spec.names[token.lower()]
    else:
        raise ScheduleError(f"{token!r} is not a valid {spec.name}")
    if not spec.low <= number <= spec.high:
        raise ScheduleError(f"{number} is out of range for {spec.name} ({spec.low}-{spec.high})")
    return number


def never_fires(spec: CronSpec) -> bool:
    """True when no date can match (``0 0 30 2 *``). Days of week always occur, so only a
    day-of-month restriction that no allowed month can hold makes a schedule dead."""
    if spec.dow_restricted and not spec.dom_restricted:
        return False
    if spec.dom_restricted and spec.dow_restricted:
        return False  # cron ORs the two fields: any allowed weekday fires
    return spec.days[0] > max(_LONGEST[m] for m in spec.months)


_LONGEST = {m: calendar.monthrange(2024, m)[1] for m in range(1, 13)}  # 2024: a leap year
