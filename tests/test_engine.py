"""The scheduler's timing decisions, driven by a FakeClock: no processes, no files, no sleeps."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from cronfile.center.scheduler import (
    MAX_ENUMERATED_SLOTS,
    Action,
    RecordSlot,
    Scheduler,
    StartRun,
    StopRuns,
    jitter_for,
)
from cronfile.clock import FakeClock
from cronfile.schedules.model import CatchUp, Concurrency, Job, Retries, RunStatus, Trigger


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def job(name: str = "j", schedule: str | tuple[str, ...] | None = "*/1 * * * * *", **kw: object) -> Job:
    schedules = (schedule,) if isinstance(schedule, str) else (schedule or ())
    return Job(name=name, command="true", schedules=schedules, **kw)  # type: ignore[arg-type]


def drive(sched: Scheduler, clock: FakeClock, until: float) -> list[Action]:
    """Advance the clock from due time to due time up to ``until``, collecting actions."""
    actions: list[Action] = []
    while True:
        due = sched.next_due()
        if due is None or due > until:
            break
        clock.advance(max(0.0, due - clock.time()))
        actions.extend(sched.tick(clock.time()))
    clock.advance(max(0.0, until - clock.time()))
    actions.extend(sched.tick(clock.time()))
    return actions


def starts(actions: list[Action]) -> list[StartRun]:
    return [a for a in actions if isinstance(a, StartRun)]


def records(actions: list[Action]) -> list[RecordSlot]:
    return [a for a in actions if isinstance(a, RecordSlot)]


# ---------------------------------------------------------------------- daylight saving


def test_fall_back_day_fixed_time_fires_once() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    clock = FakeClock(utc(2026, 10, 24, 12))
    sched = Scheduler()
    sched.set_job(job("nightly", "30 2 * * *", timezone="Europe/Berlin"), clock.time())
    acts = drive(sched, clock, utc(2026, 10, 26, 12))
    slots = [a.scheduled_at for a in starts(acts)]
    assert records(acts) == []
    on_day = [s for s in slots if datetime.fromtimestamp(s, berlin).date().isoformat() == "2026-10-25"]
    # once, at the first 02:30 (CEST, 00:30 UTC), never again at 02:30 CET (01:30 UTC)
    assert on_day == [utc(2026, 10, 25, 0, 30)]
    assert slots == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_spring_forward_day_fires_at_first_valid_instant() -> None:
    clock = FakeClock(utc(2026, 3, 28, 12))
    sched = Scheduler()
    sched.set_job(job("nightly", "30 2 * * *", timezone="Europe/Berlin"), clock.time())
    acts = drive(sched, clock, utc(2026, 3, 30, 12))
    # 2026-03-29 02:30 does not exist in Berlin: 03:00 CEST = 01:00 UTC
    assert [a.scheduled_at for a in starts(acts)] == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


def test_interval_job_follows_real_elapsed_time_across_fall_back() -> None:
    clock = FakeClock(utc(2026, 10, 24, 22))  # 00:00 CEST on the 25th
    sched = Scheduler()
    sched.set_job(job("q", "*/15 * * * *", timezone="Europe/Berlin"), clock.time())
    acts = drive(sched, clock, utc(2026, 10, 25, 23))  # 00:00 CET on the 26th
    slots = [a.scheduled_at for a in starts(acts)]
    assert len(slots) == 100  # a 25-hour day
    assert {b - a for a, b in zip(slots, slots[1:], strict=False)} == {900.0}


# ---------------------------------------------------------------------- concurrency


def _second_tick(policy: Concurrency) -> tuple[list[Action], Scheduler]:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    sched.set_job(job("c", concurrency=policy), t0)
    first = sched.tick(t0 + 1)
    assert [type(a) for a in first] == [StartRun]
    sched.started("c", "run-1")
    return sched.tick(t0 + 2), sched


def test_concurrency_forbid_records_skip() -> None:
    acts, sched = _second_tick(Concurrency.FORBID)
    assert len(acts) == 1 and isinstance(acts[0], RecordSlot)
    assert acts[0].status is RunStatus.SKIPPED
    assert acts[0].scheduled_at == utc(2026, 5, 1, 10) + 2
    assert "forbid" in acts[0].reason
    # once the run ends, the next slot starts again
    assert sched.finished("c", "run-1", RunStatus.SUCCEEDED, 0, utc(2026, 5, 1, 10) + 1, 1, None,
                          utc(2026, 5, 1, 10) + 2.5) == []
    nxt = sched.tick(utc(2026, 5, 1, 10) + 3)
    assert [type(a) for a in nxt] == [StartRun]


def test_concurrency_allow_starts_alongside() -> None:
    acts, _ = _second_tick(Concurrency.ALLOW)
    assert [type(a) for a in acts] == [StartRun]
    assert acts[0].scheduled_at == utc(2026, 5, 1, 10) + 2  # type: ignore[union-attr]


def test_concurrency_replace_stops_then_starts() -> None:
    acts, _ = _second_tick(Concurrency.REPLACE)
    assert [type(a) for a in acts] == [StopRuns, StartRun]
    assert acts[0].job == "c"  # type: ignore[union-attr]
    assert acts[1].scheduled_at == utc(2026, 5, 1, 10) + 2  # type: ignore[union-attr]


def test_concurrency_queue_holds_one_slot_and_skips_the_next() -> None:
    t0 = utc(2026, 5, 1, 10)
    acts, sched = _second_tick(Concurrency.QUEUE)
    assert acts == []  # the slot at t0+2 waits behind run-1
    assert sched.pending_start_floor() == t0 + 2  # the watermark must not pass it
    third = sched.tick(t0 + 3)
    assert [(type(a), a.scheduled_at, a.status) for a in records(third)] == [
        (RecordSlot, t0 + 3, RunStatus.SKIPPED)]
    assert records(third)[0].reason == ("previous run still running and the slot of "
                                        "2026-05-01T10:00:02Z already waits (concurrency: queue)")
    assert len(third) == 1
    # run-1 ends: the waiting slot starts at once, with its own scheduled time
    after = sched.finished("c", "run-1", RunStatus.SUCCEEDED, 0, t0 + 1, 1, None, t0 + 3.5)
    assert [(type(a), a.scheduled_at) for a in after] == [(StartRun, t0 + 2)]
    assert sched.pending_start_floor() is None
    sched.started("c", "run-2")
    assert sched.tick(t0 + 4) == []  # t0+4 waits behind run-2 now
    assert sched.finished("c", "run-2", RunStatus.FAILED, 1, t0 + 2, 1, None, t0 + 4.5) != []


def test_concurrency_queue_waiting_past_starting_deadline_is_missed() -> None:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    sched.set_job(job("c", concurrency=Concurrency.QUEUE, starting_deadline_s=5.0), t0)
    assert [type(a) for a in sched.tick(t0 + 1)] == [StartRun]
    sched.started("c", "run-1")
    assert sched.tick(t0 + 2) == []
    late = sched.finished("c", "run-1", RunStatus.SUCCEEDED, 0, t0 + 1, 1, None, t0 + 9)
    assert [(type(a), a.scheduled_at, a.status) for a in records(late)] == [
        (RecordSlot, t0 + 2, RunStatus.MISSED)]
    assert "starting_deadline" in records(late)[0].reason


def test_concurrency_queue_survives_a_reload() -> None:
    t0 = utc(2026, 5, 1, 10)
    acts, sched = _second_tick(Concurrency.QUEUE)
    assert acts == []
    sched.set_job(job("c", concurrency=Concurrency.QUEUE, description="changed"), t0 + 2.5)
    after = sched.finished("c", "run-1", RunStatus.SUCCEEDED, 0, t0 + 1, 1, None, t0 + 2.7)
    assert [(type(a), a.scheduled_at) for a in after] == [(StartRun, t0 + 2)]
    assert starts(after)[0].job.description == "changed"


def test_manual_run_ignores_forbid() -> None:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    sched.set_job(job("c", "0 0 1 1 *"), t0)
    sched.started("c", "x")
    acts = sched.run_now("c", t0)
    assert acts == [StartRun(sched.jobs["c"], t0, 1, "manual")]


# ---------------------------------------------------------------------- deadlines, jitter


def test_starting_deadline_records_missed_never_late() -> None:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    sched.set_job(job("d", "0 * * * *", starting_deadline_s=5.0), t0)
    late = sched.tick(t0 + 3600 + 10)
    assert len(late) == 1 and isinstance(late[0], RecordSlot)
    assert late[0].status is RunStatus.MISSED
    assert late[0].scheduled_at == t0 + 3600
    assert "starting_deadline" in late[0].reason
    in_time = sched.tick(t0 + 7200 + 4)
    assert [type(a) for a in in_time] == [StartRun]


def test_jitter_stable_per_slot_and_below_bound() -> None:
    j = job("jit", "0 * * * *", jitter_s=30.0)
    values = [jitter_for(j, utc(2026, 5, 1, h)) for h in range(24)]
    assert all(0.0 <= v < 30.0 for v in values)
    assert len(set(values)) > 1  # spread, not one constant
    assert values == [jitter_for(j, utc(2026, 5, 1, h)) for h in range(24)]  # stable
    assert jitter_for(job("nojit", "0 * * * *"), utc(2026, 5, 1)) == 0.0

    t0 = utc(2026, 5, 1, 9, 30)
    sched = Scheduler()
    sched.set_job(j, t0)
    slot = utc(2026, 5, 1, 10)
    assert sched.tick(slot) == []  # delayed by the jitter
    assert sched.pending_start_floor() == slot  # the watermark must not pass the slot
    assert sched.next_due() == pytest.approx(slot + values[10])
    acts = sched.tick(slot + values[10])
    assert acts == [StartRun(j, slot, 1, "schedule", None)]
    assert sched.pending_start_floor() is None


# ---------------------------------------------------------------------- retries, chains, triggers


def test_retries_with_backoff() -> None:
    t0 = utc(2026, 5, 1, 10)
    j = job("r", "0 0 1 1 *", retries=Retries(max=2, backoff_s=10.0, factor=2.0))
    sched = Scheduler()
    sched.set_job(j, t0)
    slot = t0 - 5
    assert sched.finished("r", "a1", RunStatus.FAILED, 1, slot, 1, "local", t0) == []
    assert sched.next_due() == t0 + 10
    assert sched.tick(t0 + 9.9) == []
    assert sched.tick(t0 + 10) == [StartRun(j, slot, 2, "retry", "local")]
    sched.finished("r", "a2", RunStatus.TIMEOUT, None, slot, 2, "local", t0 + 12)
    assert sched.next_due() == t0 + 12 + 20  # backoff * factor
    assert sched.tick(t0 + 32) == [StartRun(j, slot, 3, "retry", "local")]
    sched.finished("r", "a3", RunStatus.FAILED, 1, slot, 3, "local", t0 + 40)
    assert sched.next_due() == utc(2027, 1, 1)  # no fourth attempt: only the next slot


def test_retry_on_exit_codes_limits_retries() -> None:
    t0 = utc(2026, 5, 1, 10)
    j = job("r", "0 0 1 1 *", retries=Retries(max=3, backoff_s=1.0, retry_on_exit_codes=(75,)))
    sched = Scheduler()
    sched.set_job(j, t0)
    sched.finished("r", "a1", RunStatus.FAILED, 1, t0, 1, None, t0)
    assert sched.next_due() == utc(2027, 1, 1)
    sched.finished("r", "a1", RunStatus.FAILED, 75, t0, 1, None, t0)
    assert sched.next_due() == t0 + 1
    # a success never retries
    sched2 = Scheduler()
    sched2.set_job(j, t0)
    sched2.finished("r", "a1", RunStatus.SUCCEEDED, 0, t0, 1, None, t0)
    assert sched2.next_due() == utc(2027, 1, 1)


def test_after_chain_fires_when_all_deps_succeeded() -> None:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    for name in ("a", "b"):
        sched.set_job(job(name, "0 0 1 1 *"), t0)
    c = job("c", None, after=("a", "b"))
    sched.set_job(c, t0)
    assert sched.finished("a", "1", RunStatus.SUCCEEDED, 0, t0, 1, None, t0) == []
    assert sched.finished("b", "2", RunStatus.FAILED, 1, t0, 1, None, t0 + 1) == []
    acts = sched.finished("b", "3", RunStatus.SUCCEEDED, 0, t0, 1, None, t0 + 2)
    assert acts == [StartRun(c, t0 + 2, 1, "after", None)]
    # the chain starts over: one more success of a alone does not fire c
    assert sched.finished("a", "4", RunStatus.SUCCEEDED, 0, t0, 1, None, t0 + 3) == []


def test_trigger_with_delay() -> None:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    j = job("deploy-hook", None, trigger=Trigger("deployed", 30.0))
    sched.set_job(j, t0)
    sched.set_job(job("other", None, trigger=Trigger("other")), t0)
    assert sched.trigger("nothing-listens", t0) == []
    assert sched.trigger("deployed", t0) == ["deploy-hook"]
    assert sched.tick(t0 + 29) == []
    assert sched.tick(t0 + 30) == [StartRun(j, t0 + 30, 1, "trigger", None)]
    assert sched.tick(t0 + 60) == []


# ---------------------------------------------------------------------- wall clock steps


def test_wall_clock_step_forward_one_run_and_one_bounded_missed() -> None:
    t0 = utc(2026, 5, 1, 10)
    clock = FakeClock(t0)
    sched = Scheduler()
    j = job("s")
    sched.set_job(j, clock.time())
    clock.advance(1)
    assert sched.tick(clock.time()) == [StartRun(j, t0 + 1)]
    clock.step_wall(100)
    acts = sched.tick(clock.time())
    assert acts == [
        RecordSlot(j, t0 + 2, RunStatus.MISSED, acts[0].reason, 99, t0 + 100),  # type: ignore[union-attr]
        StartRun(j, t0 + 101),
    ]


def test_huge_step_forward_still_runs_latest_and_stays_bounded() -> None:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    j = job("s")
    sched.set_job(j, t0)
    now = t0 + 86400
    acts = sched.tick(now)
    assert len(acts) == 2
    missed, start = acts
    assert isinstance(missed, RecordSlot) and isinstance(start, StartRun)
    assert start.scheduled_at == now  # the LATEST slot runs, not an old one
    assert missed.scheduled_at == t0 + 1 and missed.last_scheduled_at == now - 1
    assert MAX_ENUMERATED_SLOTS <= missed.count <= 86399
    assert sched.next_due() == now + 1


def test_wall_clock_step_back_never_replays() -> None:
    t0 = utc(2026, 5, 1, 10)
    clock = FakeClock(t0)
    sched = Scheduler()
    sched.set_job(job("s"), clock.time())
    acts = drive(sched, clock, t0 + 5)
    assert [a.scheduled_at for a in starts(acts)] == [t0 + i for i in range(1, 6)]
    clock.step_wall(-3)
    for _ in range(3):
        assert sched.tick(clock.time()) == []
        clock.advance(1)
    # back at t0+5: still nothing new; t0+6 is the next slot
    assert sched.tick(clock.time()) == []
    clock.advance(1)
    assert [a.scheduled_at for a in sched.tick(clock.time())] == [t0 + 6]


def test_reload_unchanged_schedule_keeps_timing_and_removed_job_stops() -> None:
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    j = job("s")
    sched.set_job(j, t0)
    assert [a.scheduled_at for a in sched.tick(t0 + 1)] == [t0 + 1]  # type: ignore[union-attr]
    sched.set_job(job("s", timeout_s=5.0), t0 + 1)  # changed, same schedule: no replay
    assert sched.tick(t0 + 1) == []
    assert [a.scheduled_at for a in sched.tick(t0 + 2)] == [t0 + 2]  # type: ignore[union-attr]
    sched.remove_job("s")
    assert sched.tick(t0 + 10) == []
    assert sched.next_due() is None


# ---------------------------------------------------------------------- catch-up


def test_catch_up_none_records_one_bounded_missed() -> None:
    now = utc(2026, 5, 1, 10)
    since = now - 600
    sched = Scheduler()
    j = job("m", "* * * * *")
    sched.set_job(j, now)
    acts = sched.catch_up("m", since, now, done={since + 120})
    assert acts == [RecordSlot(j, since + 60, RunStatus.MISSED, "the center was not running", 9, now)]


def test_catch_up_latest_runs_most_recent_once() -> None:
    now = utc(2026, 5, 1, 10, 0, 30)
    since = now - 630
    sched = Scheduler()
    j = job("m", "* * * * *", catch_up=CatchUp.LATEST)
    sched.set_job(j, now)
    acts = sched.catch_up("m", since, now, done=set())
    latest = utc(2026, 5, 1, 10)
    assert acts == [
        RecordSlot(j, utc(2026, 5, 1, 9, 51), RunStatus.MISSED, "the center was not running", 9,
                   latest - 60),
        StartRun(j, latest, 1, "catch_up"),
    ]
    # one slot down: only the run, no missed record
    sched2 = Scheduler()
    sched2.set_job(j, now)
    assert sched2.catch_up("m", latest - 1, now, set()) == [StartRun(j, latest, 1, "catch_up")]
    # nothing due, or every slot already in the ledger: nothing at all
    assert sched2.catch_up("m", latest, now, set()) == []
    assert sched2.catch_up("m", latest - 120, now, {latest - 60, latest}) == []


def test_catch_up_long_outage_is_bounded_and_runs_latest() -> None:
    now = utc(2026, 5, 1, 10)
    since = now - 86400
    sched = Scheduler()
    j = job("p", catch_up=CatchUp.LATEST)
    sched.set_job(j, now)
    acts = sched.catch_up("p", since, now, set())
    assert len(acts) == 2
    missed, start = acts
    assert isinstance(missed, RecordSlot) and isinstance(start, StartRun)
    assert start.scheduled_at == now
    assert missed.scheduled_at == since + 1 and missed.last_scheduled_at == now - 1
    assert MAX_ENUMERATED_SLOTS - 1 <= missed.count <= 86399


# ---------------------------------------------------------------------- suspend


def test_suspended_job_never_fires() -> None:
    t0 = utc(2026, 5, 1, 10)
    clock = FakeClock(t0)
    sched = Scheduler()
    sched.set_job(job("z", suspend=True, catch_up=CatchUp.LATEST), t0)
    sched.set_job(job("zt", None, trigger=Trigger("go"), suspend=True), t0)
    assert drive(sched, clock, t0 + 30) == []
    clock.step_wall(100)
    assert sched.tick(clock.time()) == []
    assert sched.trigger("go", clock.time()) == []
    assert sched.catch_up("z", t0, clock.time(), set()) == []


def test_catch_up_never_covers_slots_already_armed() -> None:
    """A restart: the job is armed at t0+0.5, catch-up runs a little later (t0+1.2). Slot
    t0+1 belongs to the normal fire path; counting it missed too would give it two outcomes."""
    t0 = utc(2026, 5, 1, 10)
    sched = Scheduler()
    j = job("s")
    sched.set_job(j, t0 + 0.5)
    acts = sched.catch_up("s", t0 - 5, t0 + 1.2, set())
    assert acts == [RecordSlot(j, t0 - 4, RunStatus.MISSED, "the center was not running", 5, t0)]
    assert sched.tick(t0 + 1.2) == [StartRun(j, t0 + 1)]
