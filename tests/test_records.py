"""Every kind of run record: exactly the fields, order and values the center wrote before
they had one typed builder (compared with literal records)."""

from __future__ import annotations

from datetime import UTC, datetime

from cronfile.schedules.model import RunStatus
from cronfile.state.ledger import encode_record
from cronfile.state.runrecord import RecordKind, RunRecord, outcome_fields
from cronfile.transports.executor import RunOutcome

BASE = {"run_id": "3f2a", "job": "nightly", "agent": "local", "transport": "local",
        "scheduled_at": "2026-11-22T02:00:00Z", "attempt": 1,
        "revision": {"content_hash": "abc"}, "trigger": "manual"}


def test_a_skipped_slot_as_recorded_today() -> None:
    record = RunRecord.without_outcome(BASE, RunStatus.SKIPPED, "concurrency: forbid").to_json()
    assert list(record.items()) == [*BASE.items(), ("record", "finished"), ("status", "skipped"),
                                    ("exit_code", None), ("signal", None),
                                    ("started_at", None), ("finished_at", None),
                                    ("duration_s", 0.0), ("output_tail", ""),
                                    ("reason", "concurrency: forbid")]


def test_a_missed_range_keeps_its_extra_fields_last_in_order() -> None:
    extra = (("count", 3), ("first_scheduled_at", "2026-11-22T02:00:00Z"),
             ("last_scheduled_at", "2026-11-22T02:02:00Z"))
    record = RunRecord.without_outcome(BASE, RunStatus.MISSED, "catch_up: skip", extra=extra).to_json()
    assert list(record)[-4:] == ["reason", "count", "first_scheduled_at", "last_scheduled_at"]
    assert record["count"] == 3 and record["duration_s"] == 0.0


def test_a_refused_start_is_failed_with_its_finish_time() -> None:
    record = RunRecord.without_outcome(BASE, RunStatus.FAILED, "workdir missing",
                             finished_at="2026-11-22T02:00:00.250Z").to_json()
    assert (record["status"], record["started_at"], record["finished_at"],
            record["duration_s"]) == ("failed", None, "2026-11-22T02:00:00.250Z", 0.0)


def test_a_lost_run_has_an_unknown_duration() -> None:
    record = RunRecord.without_outcome(BASE, RunStatus.LOST, "the center stopped",
                             started_at="2026-11-22T02:00:00.010Z").to_json()
    assert (record["status"], record["started_at"], record["duration_s"]) == (
        "lost", "2026-11-22T02:00:00.010Z", None)


def test_records_queued_together_share_one_write_and_wait_while_busy() -> None:
    import asyncio

    from cronfile.center.records import RECORD_BATCH_S, RecordWriter

    writes: list[list[str]] = []
    busy = [False]

    async def go() -> None:
        writer = RecordWriter(lambda batch: writes.append([r["run_id"] for r in batch]),
                              lambda: busy[0])
        writer.add({"run_id": "a"})
        writer.add({"run_id": "b"})
        await asyncio.sleep(RECORD_BATCH_S * 4)
        assert writes == [["a", "b"]]
        busy[0] = True  # a burst: the timer writes nothing, the burst's end flushes
        writer.add({"run_id": "c"})
        await asyncio.sleep(RECORD_BATCH_S * 4)
        assert writes == [["a", "b"]]
        busy[0] = False
        writer.flush()
        assert writes == [["a", "b"], ["c"]]

    asyncio.run(go())


OUTCOME = RunOutcome(RunStatus.FAILED, datetime(2026, 11, 22, 2, 0, 0, 10000, UTC),
                     datetime(2026, 11, 22, 2, 0, 1, 510000, UTC), exit_code=3,
                     output_tail="boom\n")
OUTCOME_ITEMS = [("status", "failed"), ("exit_code", 3), ("signal", None),
                 ("started_at", "2026-11-22T02:00:00.010Z"),
                 ("finished_at", "2026-11-22T02:00:01.510Z"), ("duration_s", 1.5),
                 ("output_tail", "boom\n")]


def test_dispatched_and_started_records_as_written_today() -> None:
    assert list(RunRecord.dispatched(BASE).items()) == [*BASE.items(), ("record", "dispatched")]
    assert list(RunRecord.dispatched(BASE, term=4).items()) == [
        *BASE.items(), ("record", "dispatched"), ("term", 4)]
    started = RunRecord.started(BASE, datetime(2026, 11, 22, 2, 0, 0, 10000, UTC).timestamp())
    assert list(started.items()) == [*BASE.items(), ("record", "started"),
                                     ("started_at", "2026-11-22T02:00:00.010Z")]


def test_the_fast_builders_equal_the_typed_record() -> None:
    assert RunRecord.dispatched(BASE, term=4) == RunRecord(
        **BASE, record=RecordKind.DISPATCHED, term=4).to_json()
    assert list(RunRecord.started(BASE, 1795312800.01)) == list(RunRecord(
        **BASE, record=RecordKind.STARTED, started_at="x").to_json())


def test_a_finished_run_as_written_today() -> None:
    record = RunRecord.ended(BASE, OUTCOME).to_json()
    assert list(record.items()) == [*BASE.items(), ("record", "finished"), *OUTCOME_ITEMS]
    killed = RunRecord.ended({**BASE, "stopped_by": "uid 0"},
                             RunOutcome(RunStatus.KILLED, OUTCOME.started_at, OUTCOME.finished_at,
                                        signal=15, reason="stopped by uid 0")).to_json()
    assert list(killed)[-4:] == ["finished_at", "duration_s", "output_tail", "reason"]
    assert list(killed)[7:10] == ["trigger", "stopped_by", "record"]


def test_a_daemon_exit_as_written_today() -> None:
    base = {**BASE, "scheduled_at": None}
    record = RunRecord.ended(base, OUTCOME, run_id="3f2a.0.2", attempt=3, replica=0).to_json()
    assert list(record.items()) == [
        ("run_id", "3f2a.0.2"), ("job", "nightly"), ("agent", "local"), ("transport", "local"),
        ("scheduled_at", None), ("attempt", 3), ("revision", {"content_hash": "abc"}),
        ("trigger", "manual"), ("record", "finished"), ("replica", 0), *OUTCOME_ITEMS]


def test_agent_outcomes_after_a_restart_and_after_lost_as_written_today() -> None:
    reported = outcome_fields(OUTCOME)
    assert list(reported.items()) == OUTCOME_ITEMS  # what an agent sends, what the hub hands over
    after_restart = RunRecord.reported(BASE, reported).to_json()
    assert after_restart == {**BASE, "record": "finished", **reported}
    assert list(after_restart) == list({**BASE, "record": "finished", **reported})
    late = RunRecord.reported(BASE, reported, supersedes="lost",
                              reason="outcome delivered after the run was recorded lost").to_json()
    today = {**BASE, "record": "finished", **reported, "supersedes": "lost",
             "reason": "outcome delivered after the run was recorded lost"}
    assert list(late.items()) == list(today.items())


def test_encoded_bytes_are_unchanged() -> None:
    ts = "2026-11-22T02:00:02.000Z"
    today = {**BASE, "record": "finished", **outcome_fields(OUTCOME)}
    assert encode_record(RunRecord.ended(BASE, OUTCOME).to_json(), ts) == encode_record(today, ts)
