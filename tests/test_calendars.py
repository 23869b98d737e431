"""Calendars (SPEC §10): ``calendars:`` top-level, job ``skip: [NAME]``; skipped slots are
recorded ``skipped`` with the calendar's name, and ``next`` and ``plan`` mark them."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from centerlib import CenterProc, finished, parse_ts
from conftest import cronfile_command

from cronfile.center.scheduler import RecordSlot, Scheduler, StartRun
from cronfile.schedules.loader import load_schedules
from cronfile.schedules.model import RunStatus

CALENDAR = """\
apiVersion: cronfile/v1
calendars:
  holidays:
    dates: [2030-12-25, 2030-12-26]
    windows: [{from: "2030-12-28T10:00:00+01:00", to: "2030-12-28T14:00:00+01:00"}]
"""
JOB = """\
apiVersion: cronfile/v1
jobs:
  daily:
    schedule: "0 12 * * *"
    timezone: Europe/Berlin
    command: x
    skip: [holidays]
"""


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def write(root: Path, files: dict[str, str]) -> Path:
    schedules = root / "schedules"
    schedules.mkdir(exist_ok=True)
    for name, text in files.items():
        (schedules / name).write_text(text)
    return schedules


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cronfile_command(), *args], cwd=root, capture_output=True,
                          text=True, timeout=60)


# ---------------------------------------------------------------------- validate


def test_a_calendar_in_one_file_serves_a_job_in_another(tmp_path: Path) -> None:
    result = load_schedules(write(tmp_path, {"cal.yaml": CALENDAR, "jobs.yaml": JOB}))
    assert result.state is not None, [p.render() for p in result.problems]
    [calendar] = result.state.jobs["daily"].skip
    assert calendar.name == "holidays"
    assert calendar.dates == ("2030-12-25", "2030-12-26")
    assert calendar.windows == ((utc(2030, 12, 28, 9), utc(2030, 12, 28, 13)),)


@pytest.mark.parametrize("files, expected", [
    ({"a.yaml": JOB.replace("[holidays]", "[holiday]"), "c.yaml": CALENDAR},
     "schedules/a.yaml:7:12: error: jobs.daily.skip[0]: no calendar named 'holiday' in the "
     "calendars: of any file (did you mean 'holidays'?)"),
    ({"c.yaml": CALENDAR.replace("2030-12-26", "2030-13-26")},
     "schedules/c.yaml:4:25: error: calendars.holidays.dates[1]: '2030-13-26' is not a date"),
    ({"c.yaml": CALENDAR.replace("2030-12-28T10:00:00+01:00", "2030-12-28T10:00:00")},
     "schedules/c.yaml:5:16: error: calendars.holidays.windows[0].from: 2030-12-28T10:00:00 "
     "needs an offset (Z or +01:00): a calendar is shared by jobs in different zones"),
    ({"c.yaml": CALENDAR.replace("T14:00", "T09:00")},
     "schedules/c.yaml:5:51: error: calendars.holidays.windows[0].to: a window's `to` must "
     "be after its `from`"),
    ({"c.yaml": CALENDAR, "d.yaml": CALENDAR},
     "schedules/c.yaml:3:3: error: calendars.holidays: calendar 'holidays' is also defined at "
     "schedules/d.yaml:3"),
])
def test_calendar_mistakes_are_line_exact(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    write(tmp_path, files)
    done = cli(tmp_path, "validate")
    assert done.returncode == 1
    assert any(line.startswith(expected) for line in done.stdout.splitlines()), done.stdout


# ---------------------------------------------------------------------- scheduler


def test_slots_on_calendar_days_and_windows_are_recorded_skipped(tmp_path: Path) -> None:
    state = load_schedules(write(tmp_path, {"cal.yaml": CALENDAR, "jobs.yaml": JOB})).state
    assert state is not None
    sched = Scheduler()
    now = utc(2030, 12, 24)
    sched.set_job(state.jobs["daily"], now)
    outcomes = []
    while (due := sched.next_due()) is not None and due < utc(2030, 12, 30):
        for action in sched.tick(due):
            if isinstance(action, StartRun):
                outcomes.append((action.scheduled_at, "run"))
            elif isinstance(action, RecordSlot):
                assert action.status is RunStatus.SKIPPED
                outcomes.append((action.scheduled_at, action.reason))
    assert outcomes == [
        (utc(2030, 12, 24, 11), "run"),
        (utc(2030, 12, 25, 11), "calendar holidays: 2030-12-25 is one of its dates"),
        (utc(2030, 12, 26, 11), "calendar holidays: 2030-12-26 is one of its dates"),
        (utc(2030, 12, 27, 11), "run"),
        (utc(2030, 12, 28, 11), "calendar holidays: inside its window 2030-12-28T09:00:00Z "
                                "- 2030-12-28T13:00:00Z"),
        (utc(2030, 12, 29, 11), "run"),
    ]


def test_dates_are_days_in_the_jobs_own_zone(tmp_path: Path) -> None:
    """23:30 on 24 December in New York is 25 December in UTC: not a holiday there."""
    job = JOB.replace('"0 12 * * *"', '"30 23 * * *"').replace("Europe/Berlin", "America/New_York")
    state = load_schedules(write(tmp_path, {"cal.yaml": CALENDAR, "jobs.yaml": job})).state
    assert state is not None
    daily = state.jobs["daily"]
    assert daily.skipped_because(utc(2030, 12, 25, 4, 30)) is None  # 24 Dec, 23:30 local
    assert daily.skipped_because(utc(2030, 12, 26, 4, 30)) == \
        "calendar holidays: 2030-12-25 is one of its dates"


# ---------------------------------------------------------------------- next and plan


def test_next_marks_the_skipped_slots(tmp_path: Path) -> None:
    write(tmp_path, {"cal.yaml": CALENDAR, "jobs.yaml": JOB})
    text = cli(tmp_path, "next", "daily", "-n", "3", "--after", "2030-12-24T00:00:00Z")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1:] == [
        "  2030-12-24 12:00:00 CET    (+0100)   2030-12-24T11:00:00Z",
        "  2030-12-25 12:00:00 CET    (+0100)   2030-12-25T11:00:00Z   skipped: calendar "
        "holidays: 2030-12-25 is one of its dates",
        "  2030-12-26 12:00:00 CET    (+0100)   2030-12-26T11:00:00Z   skipped: calendar "
        "holidays: 2030-12-26 is one of its dates",
    ]
    data = json.loads(cli(tmp_path, "next", "-n", "2", "--after", "2030-12-24T00:00:00Z",
                          "--format", "json").stdout)
    assert data[0]["skipped"] == [{"time": "2030-12-25T12:00:00+01:00",
                                   "reason": "calendar holidays: 2030-12-25 is one of its dates"}]


def test_plan_marks_the_skipped_slots_and_shows_the_calendar(tmp_path: Path) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    calendar = CALENDAR.replace("2030-12-25", tomorrow)
    job = JOB.replace("Europe/Berlin", "UTC")
    write(tmp_path, {"cal.yaml": calendar, "jobs.yaml": job})
    (tmp_path / "state").mkdir()
    done = cli(tmp_path, "plan", "--state", "state")
    assert done.returncode == 0, done.stderr
    assert f"skip: [holidays (dates 2030-12-26, {tomorrow}; windows " in done.stdout \
        or f"skip: [holidays (dates {tomorrow}, 2030-12-26; windows " in done.stdout
    marked = [line for line in done.stdout.splitlines() if "(skipped: " in line]
    assert len(marked) == 1
    assert marked[0].endswith(f"(skipped: calendar holidays: {tomorrow} is one of its dates)")
    data = json.loads(cli(tmp_path, "plan", "--state", "state", "--format", "json").stdout)
    [daily] = data["jobs"]
    assert daily["skipped_slots"] == {"after": [{
        "time": f"{tomorrow}T12:00:00+00:00",
        "reason": f"calendar holidays: {tomorrow} is one of its dates"}]}


# ---------------------------------------------------------------------- a real center


def test_center_records_skipped_slots_with_the_calendar_name(tmp_path: Path) -> None:
    start = datetime.fromtimestamp(int(datetime.now(UTC).timestamp()) + 3, UTC)
    end = start + timedelta(seconds=3)
    c = CenterProc(tmp_path)
    c.write("a.yaml", f"""\
apiVersion: cronfile/v1
calendars:
  freeze:
    windows: [{{from: "{start.isoformat()}", to: "{end.isoformat()}"}}]
jobs:
  tick:
    schedule: "*/1 * * * * *"
    command: [/bin/true]
    skip: [freeze]
""")
    try:
        c.start()
        c.wait_runs(lambda rs: [r for r in finished(rs, "tick", "succeeded")
                                if (parse_ts(r["scheduled_at"]) or 0) >= end.timestamp()], 20,
                    "a run after the window")
    finally:
        assert c.stop() == 0
    records = finished(c.runs(), "tick")
    inside = [r for r in records if start.timestamp() <= (parse_ts(r["scheduled_at"]) or 0) < end.timestamp()]
    assert [r["status"] for r in inside] == ["skipped"] * 3
    assert all(r["reason"].startswith("calendar freeze: inside its window ") for r in inside)
    outside = [r for r in records if r not in inside]
    assert outside and all(r["status"] == "succeeded" for r in outside)


def test_an_applied_state_read_back_keeps_the_calendars_of_its_jobs(tmp_path: Path) -> None:
    """The center reloads applied.json from its stored files: a calendar declared in one
    file and skipped from another must come back with its dates and windows."""
    from cronfile.state.applied import read_applied, write_applied

    state = load_schedules(write(tmp_path, {"cal.yaml": CALENDAR, "jobs.yaml": JOB})).state
    assert state is not None
    write_applied(tmp_path / "state", state)
    restored = read_applied(tmp_path / "state")
    assert restored is not None
    assert restored.jobs["daily"].skip == state.jobs["daily"].skip
    assert restored.jobs["daily"].skip[0].dates == ("2030-12-25", "2030-12-26")
