"""The records written without a transport's outcome: exactly the fields, order and values
the center wrote before they had one builder (compared with literal records)."""

from __future__ import annotations

from cronfile.center.records import NoOutcomeRecord
from cronfile.schedules.model import RunStatus

BASE = {"run_id": "3f2a", "job": "nightly", "agent": "local", "transport": "local",
        "scheduled_at": "2026-11-22T02:00:00Z", "attempt": 1,
        "revision": {"content_hash": "abc"}, "trigger": "manual"}


def test_a_skipped_slot_as_recorded_today() -> None:
    record = NoOutcomeRecord(BASE, RunStatus.SKIPPED, "concurrency: forbid").to_json()
    assert list(record.items()) == [*BASE.items(), ("record", "finished"), ("status", "skipped"),
                                    ("exit_code", None), ("signal", None),
                                    ("started_at", None), ("finished_at", None),
                                    ("duration_s", 0.0), ("output_tail", ""),
                                    ("reason", "concurrency: forbid")]


def test_a_missed_range_keeps_its_extra_fields_last_in_order() -> None:
    extra = (("count", 3), ("first_scheduled_at", "2026-11-22T02:00:00Z"),
             ("last_scheduled_at", "2026-11-22T02:02:00Z"))
    record = NoOutcomeRecord(BASE, RunStatus.MISSED, "catch_up: skip", extra=extra).to_json()
    assert list(record)[-4:] == ["reason", "count", "first_scheduled_at", "last_scheduled_at"]
    assert record["count"] == 3 and record["duration_s"] == 0.0


def test_a_refused_start_is_failed_with_its_finish_time() -> None:
    record = NoOutcomeRecord(BASE, RunStatus.FAILED, "workdir missing",
                             finished_at="2026-11-22T02:00:00.250Z").to_json()
    assert (record["status"], record["started_at"], record["finished_at"],
            record["duration_s"]) == ("failed", None, "2026-11-22T02:00:00.250Z", 0.0)


def test_a_lost_run_has_an_unknown_duration() -> None:
    record = NoOutcomeRecord(BASE, RunStatus.LOST, "the center stopped",
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
