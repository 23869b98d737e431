"""One-shot ``run_at`` and ``active: {from, until}`` (SPEC §10): in validate (line-exact),
next, the scheduler (fake clock) and a real center across a restart."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from centerlib import CenterProc, dispatched, finished, wait_for
from conftest import cronfile_command

from cronfile.center.scheduler import RecordSlot, Scheduler, StartRun
from cronfile.schedules.loader import load_file
from cronfile.schedules.model import Active, Job, RunStatus, Trigger


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def problems(text: str) -> list[str]:
    return [p.render() for p in load_file("a.yaml", text.encode()).problems]


HEAD = "apiVersion: cronfile/v1\njobs:\n  once:\n    command: [/bin/true]\n"


# ---------------------------------------------------------------------- validate


def test_run_at_is_read_with_its_offset_or_in_the_jobs_zone() -> None:
    [with_offset] = load_file("a.yaml", (HEAD + "    run_at: 2026-12-24T18:00:00+01:00\n").encode()).jobs
    assert with_offset.run_at == utc(2026, 12, 24, 17)
    assert with_offset.schedules == ()
    [in_zone] = load_file("a.yaml", (HEAD + "    run_at: '2026-07-01 09:30'\n"
                                     "    timezone: America/New_York\n").encode()).jobs
    assert in_zone.run_at == utc(2026, 7, 1, 13, 30)


def test_run_at_in_the_past_is_a_warning_at_its_line() -> None:
    assert problems(HEAD + "    run_at: 2020-01-01T00:00:00Z\n") == [
        "a.yaml:5:5: warning: jobs.once.run_at: run_at 2020-01-01T00:00:00Z is in the past: "
        "this one-shot job will not fire (again)"]


@pytest.mark.parametrize("extra, expected", [
    ("    run_at: 2026-13-01T00:00:00Z\n",
     "a.yaml:5:5: error: jobs.once.run_at: '2026-13-01T00:00:00Z' is not an ISO-8601 time "
     "(e.g. 2026-12-24T18:00:00+01:00)"),
    ("    run_at: tomorrow\n", "a.yaml:5:5: error: jobs.once.run_at: 'tomorrow' is not an "
     "ISO-8601 time"),
    ("    run_at: 2030-01-01\n", "a.yaml:5:5: error: jobs.once.run_at: '2030-01-01' is not an "
     "ISO-8601 time"),
    ("    schedule: '@daily'\n    run_at: 2030-01-01T00:00:00Z\n",
     "a.yaml:6:5: error: jobs.once.run_at: a job has exactly one of schedule, trigger, after, "
     "run_at (this one has schedule and run_at)"),
    ("    run_at: '2030-03-31 02:30'\n    timezone: Europe/Berlin\n",
     "a.yaml:5:5: error: jobs.once.run_at: 2030-03-31 02:30 does not exist in Europe/Berlin "
     "(daylight saving): give an offset"),
    ("    run_at: '2030-10-27 02:30'\n    timezone: Europe/Berlin\n",
     "a.yaml:5:5: error: jobs.once.run_at: 2030-10-27 02:30 happens twice in Europe/Berlin "
     "(daylight saving): give an offset"),
    ("    schedule: '@daily'\n    active: {from: 2030-02-01T00:00:00Z, until: 2030-01-01T00:00:00Z}\n",
     "a.yaml:6:42: error: jobs.once.active.until: active.until must be after active.from"),
    ("    schedule: '@daily'\n    active: {}\n", "a.yaml:6:5: error: jobs.once.active: "),
    ("    schedule: '@daily'\n    active: {since: 2030-02-01T00:00:00Z}\n", "a.yaml:6:"),
])
def test_bad_run_at_and_active_are_line_exact_errors(extra: str, expected: str) -> None:
    found = problems(HEAD + extra)
    assert found and found[0].startswith(expected), found
    assert " error: " in found[0]


def test_validate_command_reports_the_past_run_at(tmp_path: Path) -> None:
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / "a.yaml").write_text(HEAD + "    run_at: 2020-01-01T00:00:00Z\n")
    done = subprocess.run([*cronfile_command(), "validate", "--strict"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.startswith("schedules/a.yaml:5:5: error: jobs.once.run_at: run_at "
                                  "2020-01-01T00:00:00Z is in the past")


def test_next_shows_the_one_shot_then_nothing(tmp_path: Path) -> None:
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / "a.yaml").write_text(
        HEAD + "    run_at: 2030-12-24T18:00:00+01:00\n    timezone: Europe/Berlin\n"
        "  windowed:\n    command: x\n    schedule: '0 12 * * *'\n"
        "    active: {from: 2030-01-02T00:00:00Z, until: 2030-01-04T00:00:00Z}\n")

    def next_(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cronfile_command(), "next", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    before = next_("once", "--after", "2030-01-01T00:00:00Z", "--format", "json")
    assert json.loads(before.stdout) == ["2030-12-24T18:00:00+01:00"]
    after = next_("once", "--after", "2030-12-24T17:00:00Z")
    assert after.returncode == 0
    assert "one-shot: its time has passed" in after.stdout
    windowed = next_("windowed", "-n", "5", "--after", "2029-12-30T00:00:00Z", "--format", "json")
    assert json.loads(windowed.stdout) == ["2030-01-02T12:00:00+00:00", "2030-01-03T12:00:00+00:00"]


# ---------------------------------------------------------------------- scheduler


def test_one_shot_fires_once_and_never_again() -> None:
    at = utc(2026, 5, 1, 10, 0, 30)
    once = Job(name="once", command="true", run_at=at)
    sched = Scheduler()
    sched.set_job(once, at - 60)
    assert sched.next_due() == at
    acts = sched.tick(at + 0.1)
    assert [(type(a), a.scheduled_at) for a in acts] == [(StartRun, at)]
    sched.started("once", "r1")
    assert sched.finished("once", "r1", RunStatus.SUCCEEDED, 0, at, 1, None, at + 1) == []
    assert sched.next_due() is None
    sched.set_job(Job(name="once", command="true", run_at=at, description="edited"), at + 5)
    assert sched.next_due() is None and sched.tick(at + 3600) == []
    # a center started later: nothing is due, and catch-up skips the slot the ledger has
    later = Scheduler()
    later.set_job(once, at + 10)
    assert later.next_due() is None
    assert later.catch_up("once", at - 60, at + 10, done={at}) == []
    # ...but a one-shot whose time passed while no center ran is recorded, not dropped
    missed = later.catch_up("once", at - 60, at + 10, done=set())
    assert [(type(a), a.scheduled_at, a.status) for a in missed] == [
        (RecordSlot, at, RunStatus.MISSED)]


def test_active_window_limits_slots_triggers_and_chains() -> None:
    t0 = utc(2026, 5, 1, 10)
    active = Active(t0 + 5, t0 + 10)
    sched = Scheduler()
    sched.set_job(Job(name="w", command="true", schedules=("*/1 * * * * *",), active=active), t0)
    sched.set_job(Job(name="t", command="true", trigger=Trigger("go"), active=active), t0)
    sched.set_job(Job(name="up", command="true", schedules=("0 0 1 1 *",)), t0)
    sched.set_job(Job(name="down", command="true", after=("up",), active=active), t0)
    slots = []
    now = t0
    while (due := sched.next_due()) is not None and due < t0 + 60:
        now = due
        slots += [a.scheduled_at for a in sched.tick(now) if isinstance(a, StartRun)]
    assert slots == [t0 + s for s in range(5, 10)]
    assert sched.trigger("go", t0 + 2) == []  # before `from`
    assert sched.trigger("go", t0 + 6) == ["t"]
    assert sched.finished("up", "u1", RunStatus.SUCCEEDED, 0, t0, 1, None, t0 + 11) == []  # after `until`
    assert [a.job.name for a in sched.finished("up", "u2", RunStatus.SUCCEEDED, 0, t0 + 1, 1, None, t0 + 7)
            if isinstance(a, StartRun)] == ["down"]


# ---------------------------------------------------------------------- a real center


def test_center_runs_a_one_shot_once_across_a_restart(tmp_path: Path) -> None:
    at = datetime.fromtimestamp(int(datetime.now(UTC).timestamp()) + 3, UTC)
    c = CenterProc(tmp_path)
    c.write("a.yaml", HEAD + f"    run_at: {at.isoformat()}\n")
    try:
        c.start()
        c.wait_runs(lambda rs: finished(rs, "once", "succeeded"), 20, "the one-shot's run")
        assert c.stop() == 0
        c.start()
        wait_for(lambda: any(e.get("event") == "center_started" for e in c.events()[1:]), 15,
                 "the second center")
        restarted = max(datetime.fromisoformat(e["ts"]).timestamp()
                        for e in c.events() if e.get("event") == "center_started")
        wait_for(lambda: any(datetime.fromisoformat(e["ts"]).timestamp() > restarted + 2
                             for e in c.events() + [{"ts": datetime.now(UTC).isoformat()}]),
                 15, "two seconds of the second center")
    finally:
        assert c.stop() == 0
    runs = c.runs()
    assert len(dispatched(runs, "once")) == 1
    [final] = finished(runs, "once")
    assert final["status"] == "succeeded"
    assert final["scheduled_at"].startswith(at.strftime("%Y-%m-%dT%H:%M:%S"))


def test_plan_shows_the_one_shot_time_and_the_window(tmp_path: Path) -> None:
    (tmp_path / "schedules").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "schedules" / "a.yaml").write_text(
        HEAD + "    run_at: 2030-12-24T18:00:00+01:00\n    timezone: Europe/Berlin\n"
        "  windowed:\n    command: x\n    schedule: '0 12 * * *'\n"
        "    active: {from: 2030-01-02T00:00:00Z, until: 2030-01-04T00:00:00Z}\n")
    done = subprocess.run([*cronfile_command(), "plan", "--state", "state"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert "run_at: 2030-12-24T17:00:00Z" in lines
    assert "active.from: 2030-01-02T00:00:00Z" in lines
    assert "active.until: 2030-01-04T00:00:00Z" in lines
    assert "after:  Tue 2030-12-24 18:00 CET = 2030-12-24 17:00 UTC" in lines
