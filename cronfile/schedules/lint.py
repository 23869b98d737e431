"""Expressions and zones that are valid but rarely mean what was written, and hints for the
errors people make when they bring a schedule from another system.

:mod:`cronfile.schedules.cronexpr` says what an expression means; this module says when
that meaning is probably a surprise: ``*/90`` in minutes (only minute 0: hourly), a 6-field
line meant as 5 fields plus a year (cronfile reads 6 fields seconds first), an AWS
EventBridge expression, ``timezone: EST`` (a fixed offset, no daylight saving). Only
strings are returned; the loader places them at the offending key.
"""

from __future__ import annotations

import calendar
import functools
import re
from datetime import timedelta

from cronfile.schedules.cronexpr import ScheduleError, parse_schedule

# (name, low, high, what "only one value" makes of the field above it)
_FIELDS = (
    ("second", 0, 59, "once a minute"),
    ("minute", 0, 59, "once an hour"),
    ("hour", 0, 23, "once a day"),
    ("day-of-month", 1, 31, "once a month"),
    ("month", 1, 12, "once a year"),
    ("day-of-week", 0, 6, "once a week"),
)
_STEP = re.compile(r"^(\*|[0-9]+)(?:-([0-9]+))?/([0-9]+)$")
_NUMBER = re.compile(r"^[0-9]+$")
_YEAR = re.compile(r"^(?:19|20|21)[0-9]{2}(?:-(?:19|20|21)[0-9]{2})?(?:,(?:19|20|21)[0-9]{2})*$")
_SIX_FIELDS = "6 fields are read seconds first (second minute hour day month weekday)"


@functools.lru_cache(maxsize=4096)
def expression_warnings(text: str) -> tuple[str, ...]:
    """Warnings for a schedule that parses (cached: the same texts repeat across jobs)."""
    expr = " ".join(text.split())
    if expr.startswith("@"):
        return ()
    parts = expr.split(" ")
    out = list(_step_warnings(parts))
    if len(parts) == 6:
        six = _six_fields_warning(expr, parts)
        if six:
            out.append(six)
    return tuple(out)


def _step_warnings(parts: list[str]) -> list[str]:
    fields = _FIELDS if len(parts) == 6 else _FIELDS[1:]
    out = []
    for i, (part, (name, low, high, _)) in enumerate(zip(parts, fields, strict=True)):
        for item in part.split(","):
            match = _STEP.match(item)
            if match is None:
                continue
            base, end, step = match.group(1), match.group(2), int(match.group(3))
            first = low if base == "*" else int(base)
            last = high if base == "*" or end is None else int(end)
            if step <= last - first or last < first:
                continue
            where = f"the {name} field ({low}-{high})" if base == "*" or end is None \
                else f"the range {first}-{last}"
            warning = (f"a step of {step} is larger than {where}: {item!r} means only "
                       f"{name} {first}")
            above = _once_per_field_above(parts, i, len(fields) == 6)
            out.append(warning + (f", so this fires {above}" if above else ""))
    return out


def _once_per_field_above(parts: list[str], i: int, seconds: bool) -> str:
    """``once an hour`` when every field below index ``i`` is one number and the fields
    above it are free: then one value in field ``i`` is one run per unit of time above."""
    name, _, _, once = (_FIELDS if seconds else _FIELDS[1:])[i]
    if name == "day-of-week" or not all(_NUMBER.match(p) for p in parts[:i]):
        return ""
    above = parts[i + 1:]
    if name in ("hour", "day-of-month", "month"):  # days are free only when both are
        free = all(p in ("*", "?") for p in above)
    else:
        free = above[0] == "*"
    return once if free else ""


def _six_fields_warning(expr: str, parts: list[str]) -> str:
    """A valid 6-field line whose seconds-first reading fires every hour at a fixed minute:
    most likely 5 fields plus a year (Quartz, AWS) or a stray field."""
    second, minute, hour = parts[0], parts[1], parts[2]
    if not (_NUMBER.match(second) and _NUMBER.match(minute) and hour == "*"):
        return ""
    where = f"at minute {minute} of every hour"
    day, month, weekday = parts[3], parts[4], parts[5]
    if day not in ("*", "?"):
        where += f" on day {day}"
    if month != "*":
        where += (f" in {calendar.month_name[int(month)]}" if _NUMBER.match(month)
                  else f" in months {month}")
    if weekday not in ("*", "?"):
        where += f" on weekdays {weekday}"
    hint = f"{_SIX_FIELDS}: {expr!r} fires {where}"
    five = _five_field_form(parts)
    return hint + (f"; for 5 fields drop the last one: \"{five}\"" if five else "")


def _five_field_form(parts: list[str]) -> str:
    five = " ".join(parts[:5])
    return five if _parses(five) else ""


def _parses(expr: str) -> bool:
    try:
        parse_schedule(expr, "job")
    except ScheduleError:
        return False
    return True


def error_hint(text: str) -> str:
    """``; this looks like ...`` for a schedule that does not parse, when it is recognisably
    another system's syntax (AWS, 5 fields plus a year); else ``""``."""
    if not isinstance(text, str):
        return ""
    parts = " ".join(text.split()).split(" ")
    if len(parts) != 6:
        return ""
    aws = _aws_form(parts)
    if aws is not None:
        return ("; this looks like an AWS cron expression (minute hour day month weekday "
                "year)" + (f": in cronfile write \"{aws}\"" if aws else ""))
    if _YEAR.match(parts[5]) or parts[5] == "*":
        five = _five_field_form(parts)
        if five:
            return (f"; {_SIX_FIELDS}, and years are not supported: for 5 fields drop the "
                    f"last one: \"{five}\"")
    return ""


def _aws_form(parts: list[str]) -> str | None:
    """The cronfile spelling of an AWS EventBridge expression (``0 12 * * ? *``): ``?`` in
    its day or weekday field and a year last. None when it does not look like one, ``""``
    when it does but has no cronfile equivalent. AWS numbers weekdays 1-7 from Sunday."""
    if "?" not in (parts[2], parts[4]) or not (parts[5] == "*" or _YEAR.match(parts[5])):
        return None
    day = "*" if parts[2] == "?" else parts[2]
    weekday = "*" if parts[4] == "?" else re.sub(r"[0-9]+", _aws_weekday, parts[4])
    five = " ".join([parts[0], parts[1], day, parts[3], weekday])
    return five if _parses(five) else ""


def _aws_weekday(match: re.Match[str]) -> str:
    return str((int(match.group()) - 1) % 7)


# --------------------------------------------------------------------------- zones

# Abbreviations people write for a zone, and the IANA zone they usually mean.
_ABBREVIATIONS = {
    "EST": "America/New_York", "EDT": "America/New_York", "CST": "America/Chicago",
    "CDT": "America/Chicago", "MST": "America/Denver", "MDT": "America/Denver",
    "PST": "America/Los_Angeles", "PDT": "America/Los_Angeles", "HST": "Pacific/Honolulu",
    "AKST": "America/Anchorage", "GMT": "Europe/London", "BST": "Europe/London",
    "CET": "Europe/Berlin", "CEST": "Europe/Berlin", "EET": "Europe/Helsinki",
    "EEST": "Europe/Helsinki", "WET": "Europe/Lisbon", "MSK": "Europe/Moscow",
    "IST": "Asia/Kolkata", "JST": "Asia/Tokyo", "KST": "Asia/Seoul",
    "AEST": "Australia/Sydney", "AEDT": "Australia/Sydney", "NZST": "Pacific/Auckland",
}
_NO_WARNING = frozenset(("UTC", "GMT", "UCT", "Zulu", "Universal", "Greenwich"))


def unknown_zone_hint(name: str) -> str:
    """What to write instead of a zone name that does not exist."""
    iana = _ABBREVIATIONS.get(name.upper())
    if iana is not None:
        return f"({name} is an abbreviation, not a zone: write e.g. {iana})"
    from zoneinfo import available_timezones

    from cronfile.schedules.problems import did_you_mean

    hint = did_you_mean(name, sorted(available_timezones())).strip()
    return hint or "(use an IANA name such as Europe/Berlin or UTC)"


@functools.lru_cache(maxsize=256)
def zone_warning(name: str) -> str:
    """A warning for an existing zone that is an abbreviation with a fixed offset
    (``EST``): it never follows the daylight saving of the region it names."""
    iana = _ABBREVIATIONS.get(name)
    if iana is None or name in _NO_WARNING:
        return ""
    from cronfile.schedules.dst import transitions

    start = 1767225600.0  # 2026-01-01: tzdata's fixed zones have no transition after it
    if transitions(name, start, start + 3 * 366 * 86400) or \
            not transitions(iana, start, start + 3 * 366 * 86400):
        return ""  # tzdata gives it daylight saving (CET), or the region has none (HST)
    from cronfile.schedules.firetimes import to_datetime

    offset = to_datetime(start, name).utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    shown = f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return (f"{name!r} is a fixed offset ({shown}) with no daylight saving; for the local "
            f"time of that region write an IANA zone such as {iana}")
