"""Recovery at start, in-process: records in, what the center must know and redo out."""

from __future__ import annotations

from typing import Any

from cronfile.center.recovery import RequeueRetry, RequeueTrigger, pending_starts, recover
from cronfile.clock import FakeClock
from cronfile.schedules.model import RunStatus
from cronfile.state.ledger import iso

T0 = 1_790_000_000.0  # a whole second
REV = {"content_hash": "abc", "git_commit": None}


def base(job: str, slot: float, agent: str = "local", transport: str = "local",
         attempt: int = 1, run_id: str | None = None) -> dict[str, Any]:
    return {"run_id": run_id or f"{job}-{slot:.0f}-{attempt}", "job": job, "agent": agent,
            "transport": transport, "scheduled_at": iso(slot), "attempt": attempt,
            "revision": REV}


def finished(b: dict[str, Any], status: str, ended: float, **more: Any) -> dict[str, Any]:
    return {**b, "record": "finished", "status": status, "exit_code": 0 if status == "succeeded"
            else 1, "signal": None, "started_at": iso(ended - 1), "finished_at": iso(ended),
            "duration_s": 1.0, "output_tail": "", **more}


def test_a_local_run_in_flight_is_recorded_lost_with_the_exact_fields() -> None:
    b = base("nightly", T0)
    found = recover([{**b, "record": "started", "started_at": iso(T0 + 0.5)}])
    assert found.lost == [{**b, "record": "finished", "status": "lost", "exit_code": None,
                           "signal": None, "started_at": iso(T0 + 0.5), "finished_at": None,
                           "duration_s": None, "output_tail": "",
                           "reason": "the center stopped while the run was in flight"}]
    assert list(found.lost[0]) == ["run_id", "job", "agent", "transport", "scheduled_at",
                                   "attempt", "revision", "record", "status", "exit_code",
                                   "signal", "started_at", "finished_at", "duration_s",
                                   "output_tail", "reason"]
    assert found.done_slots == {("nightly", T0, "local")}
    assert found.awaiting_agents == {}


def test_a_run_on_an_agent_waits_for_its_report_instead_of_being_lost() -> None:
    b = base("sync", T0, agent="a1", transport="tcp")
    found = recover([{**b, "record": "dispatched"}])
    assert found.lost == []
    assert found.awaiting_agents == {b["run_id"]: b}


def test_handled_slots_missed_ranges_and_last_success() -> None:
    ok = finished(base("a", T0), "succeeded", T0 + 2)
    older_ok = finished(base("a", T0 - 60), "succeeded", T0 - 58)
    missed = {**base("b", T0 - 300), "record": "finished", "status": "missed",
              "last_scheduled_at": iso(T0 - 60), "count": 5}
    found = recover([ok, older_ok, missed])
    assert found.done_slots == {("a", T0, "local"), ("a", T0 - 60, "local"),
                                ("b", T0 - 300, "local")}
    assert found.missed_until == {"b": T0 - 60}
    assert found.last_success == {"a": T0 + 2}
    assert found.lost == []


def test_a_failed_attempt_without_a_later_one_is_retried_and_only_that() -> None:
    clock = FakeClock(T0 + 10)
    first = finished(base("r", T0, attempt=1), "failed", T0 + 1)
    second = finished(base("r", T0, attempt=2), "failed", T0 + 5)
    done = finished(base("s", T0, attempt=1), "failed", T0 + 1)
    done_retry = finished(base("s", T0, attempt=2), "succeeded", T0 + 5)
    found = recover([first, second, done, done_retry])
    starts = pending_starts(found, [], clock.time() - 6 * 3600, lambda job: True)
    assert starts == [RequeueRetry("r", second["run_id"], RunStatus.FAILED, 1, T0, 2, "local",
                                   T0 + 5)]


def test_nothing_older_than_the_horizon_or_of_a_removed_job_is_requeued() -> None:
    clock = FakeClock(T0)
    old = finished(base("r", T0 - 7 * 3600), "failed", T0 - 7 * 3600 + 1)
    gone = finished(base("removed", T0 - 60), "failed", T0 - 59)
    found = recover([old, gone])
    events = [{"event": "triggered", "due": {"t": iso(T0 - 7 * 3600)}}]
    horizon = clock.time() - 6 * 3600
    assert pending_starts(found, events, horizon, lambda job: job != "removed") == []


def test_a_triggered_start_is_requeued_once_unless_it_is_in_the_ledger() -> None:
    ran = finished(base("t1", T0 + 3), "succeeded", T0 + 4)
    found = recover([ran])
    events = [{"event": "triggered", "trigger_event": "deploy", "jobs": ["t1", "t2"],
               "due": {"t1": iso(T0 + 3), "t2": iso(T0 + 3)}},
              {"event": "triggered", "trigger_event": "deploy", "jobs": ["t2"],
               "due": {"t2": iso(T0 + 3)}},  # the same start seen twice: queued once
              {"event": "revision_applied"}]
    assert pending_starts(found, events, T0 - 3600, lambda job: True) == [
        RequeueTrigger("t2", T0 + 3)]
