"""Cron expressions other implementations accept, read as cronie reads them (issue: real
crontabs copied into cronfile must mean the same thing or be refused in plain words)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from cronfile.schedules.cronexpr import CronSpec, ScheduleError, parse_schedule
from cronfile.schedules.firetimes import JobTimer


def weekdays(text: str) -> tuple[int, ...]:
    spec = parse_schedule(text, "job")
    assert isinstance(spec, CronSpec)
    return spec.weekdays


@pytest.mark.parametrize(("text", "expected"), [
    ("0 0 * * Sat-Sun", (0, 6)),
    ("0 0 * * sat-sun", (0, 6)),
    ("0 0 * * Mon-Sun", (0, 1, 2, 3, 4, 5, 6)),
    ("0 0 * * 5-0", (0, 5, 6)),
    ("0 0 * * 1-0/2", (0, 1, 3, 5)),
    ("0 0 * * 0-0", (0,)),
    ("0 0 * * 6-7", (0, 6)),
])
def test_a_weekday_range_ending_in_sunday_as_0_means_7(text: str, expected: tuple[int, ...]) -> None:
    assert weekdays(text) == expected


@pytest.mark.parametrize("text", ["0 0 * * 5-1", "0 0 * * fri-mon", "0 0 * * 6-1"])
def test_other_backwards_weekday_ranges_are_still_refused(text: str) -> None:
    with pytest.raises(ScheduleError, match="is backwards"):
        parse_schedule(text, "job")


@pytest.mark.parametrize(("text", "field"), [
    ("0 0 l * *", "day-of-month"),
    ("0 0 lw * *", "day-of-month"),
    ("0 0 15w * *", "day-of-month"),
    ("0 0 * * sat#1", "day-of-week"),
    ("0 0 * * SAT#1", "day-of-week"),
    ("0 0 * * 5l", "day-of-week"),
    ("0 0 * * friL", "day-of-week"),
    ("0 0 * * l", "day-of-week"),
])
def test_quartz_letters_in_any_case_say_not_supported(text: str, field: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, "job")
    assert f"L, W and # are not supported in the {field} field" in str(caught.value)


def fires(expr: str, zone: str, after: str, count: int) -> list[str]:
    timer = JobTimer.for_job((expr,), zone, "job")
    start = datetime.fromisoformat(after).timestamp()
    return [datetime.fromtimestamp(t, ZoneInfo(zone)).isoformat() for t in timer.times(start, count)]


def test_a_day_skipped_by_the_date_line_is_a_correction_not_a_gap() -> None:
    """Pacific/Apia went from 2011-12-29 24:00 (UTC-10) to 2011-12-31 00:00 (UTC+14): a
    jump of 24 hours. cronie treats a change of more than 3 hours as a clock correction:
    the skipped day's slots do not fire at the first instant after it."""
    assert fires("30 2 * * *", "Pacific/Apia", "2011-12-29T00:00:00-10:00", 3) == [
        "2011-12-29T02:30:00-10:00", "2011-12-31T02:30:00+14:00", "2012-01-01T02:30:00+14:00"]
    assert fires("0 0 30 12 *", "Pacific/Apia", "2011-12-01T00:00:00-10:00", 1) == [
        "2012-12-30T00:00:00+14:00"]


def test_an_ordinary_gap_still_fires_at_its_end() -> None:
    assert fires("30 2 * * *", "Europe/Berlin", "2026-03-29T00:00:00+01:00", 1) == [
        "2026-03-29T03:00:00+02:00"]
