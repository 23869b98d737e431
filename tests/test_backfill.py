"""``cronfile backfill JOB --from T --to T``: the past slots of a job without a record run
once each, oldest first, within the job's concurrency and pools, ``trigger: backfill``."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from centerlib import CenterProc, finished, parse_ts

from cronfile.center.backfill import BackfillQueue, BackfillRefused, slots_in_range
from cronfile.schedules.model import Active, Calendar, Concurrency, Job

HOUR = 3600.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------- slots, no center


def test_slots_in_range_are_inclusive_and_leave_out_calendars_and_the_active_window() -> None:
    day = datetime(2030, 6, 3, tzinfo=UTC).timestamp()
    holiday = Calendar("h", windows=((day + 2 * HOUR, day + 3 * HOUR),))
    job = Job("j", "x", schedules=("0 * * * *",), skip=(holiday,),
              active=Active(None, day + 5 * HOUR))
    found = slots_in_range(job, day, day + 8 * HOUR, 100)
    assert found.slots == (day, day + HOUR, day + 3 * HOUR, day + 4 * HOUR)
    assert found.skipped_by_calendar == 1


def test_a_range_of_too_many_slots_is_refused() -> None:
    job = Job("every-second", "x", schedules=("* * * * * *",))
    with pytest.raises(BackfillRefused, match="more than 10,000 slots: check --from/--to, or "
                                             "pass --yes"):
        slots_in_range(job, 0.0, 3 * HOUR, 10_000)
    assert len(slots_in_range(job, 0.0, 3 * HOUR, 1_000_000).slots) == 10_801
    with pytest.raises(BackfillRefused, match="has no schedule or run_at"):
        slots_in_range(Job("chained", "x", after=("a",)), 0.0, HOUR, 10)


def test_the_queue_gives_one_slot_at_a_time_unless_the_job_allows_overlap() -> None:
    queue = BackfillQueue()
    forbid = Job("f", "x", schedules=("0 * * * *",))
    allow = Job("a", "x", schedules=("0 * * * *",), concurrency=Concurrency.ALLOW)
    queue.add("f", (3.0, 1.0))
    queue.add("f", (2.0, 1.0))  # a slot given twice is queued once
    queue.add("a", (5.0, 4.0))
    assert queue.next_starts(forbid, running=True) == []
    assert [(s.scheduled_at, s.reason) for s in queue.next_starts(forbid, running=False)] == \
        [(1.0, "backfill")]
    assert queue.pending("f") == {2.0, 3.0}
    assert [s.scheduled_at for s in queue.next_starts(allow, running=True)] == [4.0, 5.0]
    assert queue.jobs() == ["f"]


# ---------------------------------------------------------------------- a real center


def backfill(c: CenterProc, *args: str) -> tuple[int, str, str]:
    done = c.cli("backfill", *args)
    return done.returncode, done.stdout, done.stderr


def test_a_real_center_backfills_each_slot_once_oldest_first_and_never_overlapping(
        tmp_path: Path) -> None:
    top = (time.time() // HOUR) * HOUR
    first, last = top - 5 * HOUR, top - HOUR  # five hourly slots, all past
    failing = iso(first + HOUR)
    marks = tmp_path / "marks"
    c = CenterProc(tmp_path)
    c.write("b.yaml", f"""\
apiVersion: cronfile/v1
jobs:
  hourly:
    schedule: "0 * * * *"
    command: 'echo "s $(date +%s%N)" >> {marks}; sleep 0.3; echo "e $(date +%s%N)" >> {marks};
      test "$CRONFILE_SCHEDULED_AT" != "{failing}"'
""")
    try:
        c.start()
        code, out, err = backfill(c, "hourly", "--from", iso(first), "--to", iso(last),
                                  "--dry-run")
        assert code == 0, err
        assert out.splitlines() == ["backfill hourly: 5 slots would run",
                                    *(f"  {iso(first + i * HOUR)}" for i in range(5))]
        assert not finished(c.runs())  # a dry run runs nothing
        code, out, err = backfill(c, "hourly", "--from", iso(first), "--to", iso(last))
        assert code == 0, err
        assert out.splitlines()[0] == "backfill hourly: 5 slots queued"
        c.wait_runs(lambda rs: len(finished(rs, "hourly")) >= 5, 30, "five backfilled runs")
        # a second backfill of the same range (one slot of it failed) runs nothing
        code, out, err = backfill(c, "hourly", "--from", iso(first - HOUR), "--to", iso(last),
                                  "--format", "json")
        assert code == 0, err
        again = json.loads(out)
        assert (again["count"], again["already_recorded"]) == (1, 5)
        assert again["slots"] == [iso(first - HOUR)]
        c.wait_runs(lambda rs: len(finished(rs, "hourly")) >= 6, 30, "the one slot before")
    finally:
        assert c.stop() == 0
    runs = finished(c.runs(), "hourly")
    assert len(runs) == 6, runs
    assert {r["trigger"] for r in runs} == {"backfill"}
    assert sorted(r["scheduled_at"] for r in runs) == [iso(first + i * HOUR) for i in range(-1, 5)]
    assert [r["status"] for r in sorted(runs, key=lambda r: r["scheduled_at"])] == \
        ["succeeded", "succeeded", "failed", "succeeded", "succeeded", "succeeded"]
    # oldest first, one at a time (concurrency: forbid): each starts after the one before ends
    first_five = sorted(runs[:5], key=lambda r: parse_ts(r["started_at"]) or 0.0)
    assert [r["scheduled_at"] for r in first_five] == [iso(first + i * HOUR) for i in range(5)]
    for before, after in zip(first_five, first_five[1:], strict=False):
        assert parse_ts(after["started_at"]) >= parse_ts(before["finished_at"])  # type: ignore[operator]
    starts = sorted(int(line.split()[1]) for line in marks.read_text().splitlines()
                    if line.startswith("s "))
    assert len(starts) == 6


def test_backfill_refusals_are_clear(tmp_path: Path) -> None:
    c = CenterProc(tmp_path)
    c.write("b.yaml", """\
apiVersion: cronfile/v1
jobs:
  fast:
    schedule: "0 0 1 1 *"
    command: "true"
  tick:
    schedule: "* * * * * *"
    command: "true"
    suspend: true
""")
    try:
        c.start()
        code, _, err = backfill(c, "tick", "--from", "2030-01-01T00:00:00Z",
                                "--to", "2030-01-01T03:00:00Z")
        assert code == 1
        assert "more than 10,000 slots: check --from/--to, or pass --yes" in err
        code, out, err = backfill(c, "tick", "--from", "2030-01-01T00:00:00Z",
                                  "--to", "2030-01-01T03:00:00Z", "--yes", "--dry-run",
                                  "--format", "json")
        assert code == 0, err
        assert json.loads(out)["count"] == 10_801
        code, _, err = backfill(c, "nope", "--from", "2030-01-01", "--to", "2030-01-02")
        assert (code, err.strip()) == (1, "Error: no job named 'nope'")
        code, _, err = backfill(c, "fast", "--from", "yesterday", "--to", "2030-01-02")
        assert code == 2 and "--from" in err and "'yesterday' is not an ISO-8601 time" in err
        assert "Traceback" not in err
    finally:
        assert c.stop() == 0
    assert not finished(c.runs())


def test_a_backfill_of_a_job_that_allows_overlap_stays_within_its_pool(tmp_path: Path) -> None:
    top = (time.time() // HOUR) * HOUR
    marks = tmp_path / "marks"
    c = CenterProc(tmp_path)
    c.write("b.yaml", f"""\
apiVersion: cronfile/v1
pools:
  narrow: {{max_running: 2}}
jobs:
  wide:
    schedule: "0 * * * *"
    concurrency: allow
    pool: narrow
    command: 'echo "s $(date +%s%N)" >> {marks}; sleep 0.4; echo "e $(date +%s%N)" >> {marks}'
""")
    try:
        c.start()
        code, out, err = backfill(c, "wide", "--from", iso(top - 6 * HOUR), "--to", iso(top - HOUR))
        assert code == 0, err
        assert out.splitlines()[0] == "backfill wide: 6 slots queued"
        c.wait_runs(lambda rs: len(finished(rs, "wide", "succeeded")) >= 6, 30, "six runs")
    finally:
        assert c.stop() == 0
    events = sorted((int(ns), kind == "e") for kind, ns in
                    (line.split() for line in marks.read_text().splitlines()))
    level = peak = 0
    for _, ended in events:
        level += -1 if ended else 1
        peak = max(peak, level)
    assert peak == 2, f"the pool of 2 had {peak} backfilled runs at once"
