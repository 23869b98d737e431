"""Schedule expressions (:mod:`cronfile.schedules.cronexpr`) and durations: what each syntax means,
what is refused and why, ``H`` stable per job and across processes, and round trips."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cronfile.schedules.cronexpr import NICKNAMES, CronSpec, EverySpec, ScheduleError, parse_schedule
from cronfile.schedules.durations import MAX_DURATION_S, format_duration, parse_duration, parse_size
from cronfile.schedules.firetimes import JobTimer, next_local

ALL_MIN = tuple(range(60))
ALL_HOUR = tuple(range(24))
ALL_DAY = tuple(range(1, 32))
ALL_MONTH = tuple(range(1, 13))
ALL_DOW = tuple(range(7))


def cron(text: str, seed: str = "") -> CronSpec:
    spec = parse_schedule(text, seed)
    assert isinstance(spec, CronSpec)
    return spec


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(("text", "fields"), [
    ("* * * * *", ((0,), ALL_MIN, ALL_HOUR, ALL_DAY, ALL_MONTH, ALL_DOW)),
    ("*/15 2 * * *", ((0,), (0, 15, 30, 45), (2,), ALL_DAY, ALL_MONTH, ALL_DOW)),
    ("5/20 1-3 1,15 * *", ((0,), (5, 25, 45), (1, 2, 3), (1, 15), ALL_MONTH, ALL_DOW)),
    ("0-30/10 */6 ? JAN-MAR,jul MON-FRI", ((0,), (0, 10, 20, 30), (0, 6, 12, 18), ALL_DAY,
                                          (1, 2, 3, 7), (1, 2, 3, 4, 5))),
    ("0 0 * * 7", ((0,), (0,), (0,), ALL_DAY, ALL_MONTH, (0,))),
    ("0 0 * * 5-7", ((0,), (0,), (0,), ALL_DAY, ALL_MONTH, (0, 5, 6))),
    ("0 0 * * sun,Wed,FRI", ((0,), (0,), (0,), ALL_DAY, ALL_MONTH, (0, 3, 5))),
    ("0 0 * * */2", ((0,), (0,), (0,), ALL_DAY, ALL_MONTH, (0, 2, 4, 6))),
    ("  30   2  *  *  *  ", ((0,), (30,), (2,), ALL_DAY, ALL_MONTH, ALL_DOW)),
    # six fields: seconds FIRST, as in Quartz, Dkron and node-cron
    ("*/20 30 2 * * *", ((0, 20, 40), (30,), (2,), ALL_DAY, ALL_MONTH, ALL_DOW)),
    ("0 0 0 1 1 *", ((0,), (0,), (0,), (1,), (1,), ALL_DOW)),
])
def test_fields(text: str, fields: tuple[tuple[int, ...], ...]) -> None:
    spec = cron(text)
    assert (spec.seconds, spec.minutes, spec.hours, spec.days, spec.months, spec.weekdays) == fields
    assert spec.has_seconds == (len(text.split()) == 6)


@pytest.mark.parametrize("nickname", sorted(NICKNAMES))
def test_nicknames_mean_their_expansion(nickname: str) -> None:
    a, b = cron(nickname), cron(NICKNAMES[nickname])
    assert (a.minutes, a.hours, a.days, a.months, a.weekdays, a.fixed_time) == \
        (b.minutes, b.hours, b.days, b.months, b.weekdays, b.fixed_time)


@pytest.mark.parametrize(("text", "fixed"), [
    ("30 2 * * *", True), ("@daily", True), ("0 9 * * 1-5", True), ("0,30 1-3 * * *", True),
    ("H H * * *", True), ("*/10 0 2 * * *", True),
    ("*/30 * * * *", False), ("0 * * * *", False), ("@hourly", False), ("15 */2 * * *", False),
    ("H/15 * * * *", False), ("* 2 * * *", False),
])
def test_fixed_time_follows_cronie(text: str, fixed: bool) -> None:
    """cronie: a job whose minute or hour field starts with ``*`` is a wildcard job that
    follows real time; any other names wall-clock times (see test_firetimes_dst)."""
    assert cron(text, "job").fixed_time is fixed


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty schedule"),
    ("0 2 * *", "4 fields in '0 2 * *': use 5 (minute hour day month weekday) or 6"),
    ("0 0 2 * * * *", "7 fields"),
    ("60 * * * *", "60 is out of range for minute (0-59)"),
    ("0 24 * * *", "24 is out of range for hour (0-23)"),
    ("0 0 0 * *", "0 is out of range for day-of-month (1-31)"),
    ("0 0 * 13 *", "13 is out of range for month (1-12)"),
    ("0 0 * * 8", "8 is out of range for day-of-week (0-7)"),
    ("60 0 0 * * *", "60 is out of range for second (0-59)"),
    ("*/0 * * * *", "bad step '0'"),
    ("*/x * * * *", "bad step 'x'"),
    ("5-1 * * * *", "range '5-1' is backwards"),
    ("0 0 * * fri-mon", "range 'fri-mon' is backwards"),
    ("1,,2 * * * *", "empty list item"),
    ("0 0 * * xyz", "'xyz' is not a valid day-of-week"),
    ("mon * * * *", "'mon' is not a valid minute"),
    ("? * * * *", "'?' is only allowed in day-of-month and day-of-week"),
    ("R * * * *", "R (random) in the minute field is not supported"),
    ("0 R * * *", "R (random) in the hour field is not supported"),
    ("0 0 L * *", "L, W and # are not supported"),
    ("0 0 15W * *", "L, W and # are not supported"),
    ("0 0 * * 5#3", "L, W and # are not supported"),
    ("0 0 * * 5L", "L, W and # are not supported"),
    ("\u0661 * * * *", "cannot read '\u0661' in the minute field"),  # an Arabic-Indic one
    ("H(5-1) * * * *", "H range 5-1 is backwards"),
    ("0 0 30 2 *", "'0 0 30 2 *' never fires"),
    ("0 0 31 4,6,9,11 *", "never fires"),
    ("@fortnightly", "unknown nickname '@fortnightly'"),
    ("@daily 0", "unknown nickname '@daily 0'"),
    ("@reboot", "@reboot is not supported: use kind: daemon"),
    ("@every", "@every needs a duration"),
    ("@every 5 minutes", "@every needs a duration"),
    ("@every 0s", "@every needs an interval of at least 1s"),
    ("@every 200y", "@every needs a duration"),
    ("@every 9999999w", "is longer than 100 years"),
])
def test_refused(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, "job")
    assert message in str(caught.value)


@pytest.mark.parametrize("text", ["0 0 29 2 *", "0 0 31 * *", "0 0 30 2 1", "0 0 */30 2 *",
                                  "0 0 31 1-2 *", "0 0 * * WED", "0 0 1 JUL *"])
def test_rare_but_real_schedules_are_accepted(text: str) -> None:
    parse_schedule(text, "job")


@pytest.mark.parametrize(("text", "after", "expected"), [
    ("0 0 29 2 *", "2026-03-01T00:00:00Z", ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]),
    ("0 0 29 2 *", "2096-03-01T00:00:00Z", ["2104-02-29T00:00:00Z"]),  # 2100 is no leap year
    # 1 February on a Monday: 2027, then not before 2038 (both day fields restricted would
    # be OR; a */ day field is "unrestricted", so this is day 1 AND Monday, as in cron)
    ("0 0 */31 2 1", "2027-02-02T00:00:00Z", ["2038-02-01T00:00:00Z"]),
    # both day fields restricted: the 13th OR a Friday
    ("0 0 13 * 5", "2026-02-01T00:00:00Z", ["2026-02-06T00:00:00Z", "2026-02-13T00:00:00Z",
                                            "2026-02-20T00:00:00Z"]),
    ("0 0 31 * *", "2026-01-31T00:00:00Z", ["2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"]),
    ("*/20 59 23 31 12 *", "2026-12-31T23:59:30Z", ["2026-12-31T23:59:40Z",
                                                   "2027-12-31T23:59:00Z"]),
    ("@every 7m", "2026-01-01T00:00:00Z", ["2026-01-01T00:07:00Z", "2026-01-01T00:14:00Z"]),
    ("@every 7m", "2026-01-02T00:00:00Z", ["2026-01-02T00:02:00Z", "2026-01-02T00:09:00Z"]),
    ("@every 1h30m", "2026-01-01T00:00:00Z", ["2026-01-01T01:30:00Z", "2026-01-01T03:00:00Z"]),
])
def test_next_times_in_utc(text: str, after: str, expected: list[str]) -> None:
    timer = JobTimer.for_job((text,), "UTC", "job")
    assert [iso(t) for t in timer.times(ts(after), len(expected))] == expected


def _matches(spec: CronSpec, t: datetime) -> bool:
    day = t.day in spec.days
    weekday = (t.weekday() + 1) % 7 in spec.weekdays
    days = (day or weekday) if spec.dom_restricted and spec.dow_restricted else (day and weekday)
    return (days and t.month in spec.months and t.hour in spec.hours
            and t.minute in spec.minutes and t.second in spec.seconds)


@settings(max_examples=300, deadline=None)
@given(minute=st.integers(0, 59), hour=st.integers(0, 23),
       dom=st.sampled_from(["*", "1", "13", "31", "15,30", "29", "1-7", "*/10"]),
       month=st.sampled_from(["*", "2", "*/3", "1,7,12", "4"]),
       dow=st.sampled_from(["*", "0", "1-5", "6", "2,4", "7", "5"]),
       start=st.datetimes(datetime(2000, 1, 1), datetime(2090, 1, 1)))
def test_next_local_skips_days_without_missing_one(minute: int, hour: int, dom: str, month: str,
                                                   dow: str, start: datetime) -> None:
    """Days that cannot match are jumped over (monthly and weekly jobs): the result is the
    same as checking every day in turn."""
    try:
        spec = parse_schedule(f"{minute} {hour} {dom} {month} {dow}")
    except ScheduleError:
        return  # e.g. 31 February
    assert isinstance(spec, CronSpec)
    found = next_local(spec, start, inclusive=False)
    assert found is not None and found > start and _matches(spec, found)
    day = datetime(start.year, start.month, start.day)
    while day < datetime(found.year, found.month, found.day):  # no matching day in between
        day += timedelta(days=1)
        at = day.replace(hour=hour, minute=minute)
        if start < at < found:
            assert not _matches(spec, at), at


def test_every_is_anchored_so_a_restart_does_not_shift_it() -> None:
    """@every counts from the Unix epoch, not from when the center started."""
    spec = parse_schedule("@every 7m")
    assert isinstance(spec, EverySpec)
    first = JobTimer((spec,), "UTC").times(ts("2026-05-01T10:00:00Z"), 3)
    restarted = JobTimer((parse_schedule("@every 7m"),), "UTC").times(ts("2026-05-01T10:05:00Z"), 2)
    assert first[1:] == restarted
    assert all(t % 420 == 0 for t in first)


def test_a_union_of_schedules() -> None:
    timer = JobTimer.for_job(("0 9 * * 1-5", "0 12 * * 0,6"), "UTC", "job")
    got = [iso(t) for t in timer.times(ts("2026-05-01T00:00:00Z"), 4)]  # a Friday
    assert got == ["2026-05-01T09:00:00Z", "2026-05-02T12:00:00Z", "2026-05-03T12:00:00Z",
                   "2026-05-04T09:00:00Z"]


# --- H: a stable hash per job ----------------------------------------------------------------


def test_h_is_stable_per_job_and_spreads_jobs() -> None:
    minutes = {name: cron("H * * * *", name).minutes for name in (f"job-{i}" for i in range(200))}
    assert all(len(m) == 1 and 0 <= m[0] <= 59 for m in minutes.values())
    assert len({m[0] for m in minutes.values()}) > 40  # spread, not all on one minute
    assert cron("H * * * *", "job-7").minutes == minutes["job-7"]  # stable


@pytest.mark.parametrize(("text", "check"), [
    ("H(0-29) * * * *", lambda s: len(s.minutes) == 1 and 0 <= s.minutes[0] <= 29),
    ("H/15 * * * *", lambda s: len(s.minutes) == 4 and s.minutes[0] < 15
     and all(b - a == 15 for a, b in zip(s.minutes, s.minutes[1:], strict=False))),
    ("H(0-29)/10 * * * *", lambda s: len(s.minutes) == 3 and s.minutes[0] < 10),
    ("0 0 H * *", lambda s: len(s.days) == 1 and 1 <= s.days[0] <= 28),  # every month has it
    ("0 0 * * H", lambda s: len(s.weekdays) == 1 and 0 <= s.weekdays[0] <= 6),
    ("H H H H H", lambda s: all(len(f) == 1 for f in (s.minutes, s.hours, s.days, s.months))),
    ("H 0 0 * * *", lambda s: len(s.seconds) == 1),
])
def test_h_ranges(text: str, check: object) -> None:
    for name in ("a", "billing-nightly", "x" * 63):
        spec = cron(text, name)
        assert callable(check) and check(spec), (text, name, spec)


def test_h_is_the_same_in_every_process() -> None:
    """sha256, not Python's randomised hash(): every host and restart agrees."""
    code = ("from cronfile.schedules.cronexpr import parse_schedule as p; "
            "print([p('H H(0-5) H * H', f'job-{i}').minutes + p('H H(0-5) H * H', f'job-{i}').hours "
            "for i in range(20)])")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2", "random")}
    assert len(outputs) == 1
    assert outputs.pop() == str([parse_schedule("H H(0-5) H * H", f"job-{i}").minutes
                                 + parse_schedule("H H(0-5) H * H", f"job-{i}").hours
                                 for i in range(20)]) + "\n"


# --- durations and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("10m", 600), ("1h30m", 5400), ("500ms", 0.5), ("1.5h", 5400), ("2d", 172800),
    ("1w", 604800), ("0s", 0), ("1h2ms", 3600.002), (30, 30), (0, 0), (" 5m ", 300),
])
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10", "10 minutes", "1e5s", "-5s", "5M", "", "h", True, -1,
                                 float("nan"), 10**400, "5300w"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


def test_true_is_not_one_second_even_after_one_was_parsed() -> None:
    assert parse_duration(1) == 1.0
    with pytest.raises(ValueError):
        parse_duration(True)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.5, "500ms"), (90, "1m30s"), (5400, "1h30m"), (3600.002, "1h2ms"),
    (694861, "1w1d1h1m1s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@settings(max_examples=500)
@given(st.integers(0, MAX_DURATION_S * 1000))
def test_durations_round_trip(millis: int) -> None:
    seconds = millis / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["w", "d", "h", "m", "s", "ms"]),
                       st.integers(0, 1000), min_size=1))
def test_written_durations_mean_their_sum(parts: dict[str, int]) -> None:
    unit = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    text = "".join(f"{n}{u}" for u, n in parts.items())
    expected = sum(n * unit[u] for u, n in parts.items())
    assert parse_duration(text) == pytest.approx(expected, abs=1e-6)
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("64KiB", 65536), ("1MiB", 1048576), ("10KB", 10000), ("512B", 512), ("42", 42), (7, 7)])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size
