"""The JSONL ledger: group commit, torn-tail repair, tolerant reading, folding runs."""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cronfile.schedules.model import RunStatus
from cronfile.state import ledger as ledger_module
from cronfile.state.ledger import JsonlLog, Ledger, ReadStats, encode_record, fold_runs, read

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_writes_all_records_with_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = JsonlLog(tmp_path / "runs.jsonl")
    log.open()
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(ledger_module.os, "write", counting_write)
    log.append([{"run_id": "a"}, {"run_id": "b"}, {"run_id": "c"}])
    monkeypatch.undo()
    log.close()

    assert len(writes) == 1
    records = list(read(log.path))
    assert [r["run_id"] for r in records] == ["a", "b", "c"]
    for record in records:
        assert record["v"] == 1 and TS.match(record["ts"])
        assert list(record)[:2] == ["v", "ts"]


def test_append_keeps_given_v_and_ts_and_encodes_compactly(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "events.jsonl")
    log.append([{"v": 1, "ts": "2026-01-01T00:00:00.000Z", "event": "center_started"}], sync=False)
    assert log.path.read_bytes() == (
        b'{"v":1,"ts":"2026-01-01T00:00:00.000Z","event":"center_started"}\n'
    )
    log.close()


def test_values_the_center_hands_us_are_encoded() -> None:
    line = encode_record(
        {
            "status": RunStatus.TIMEOUT,
            "started_at": datetime(2026, 11, 22, 18, 58, 16, tzinfo=UTC),
            "duration_s": float("nan"),
            "nested": {"x": float("inf")},
        }
    )
    record = json.loads(line)
    assert record["status"] == "timeout"
    assert record["started_at"] == "2026-11-22T18:58:16Z"
    assert record["duration_s"] is None and record["nested"] == {"x": None}
    with pytest.raises(TypeError):
        encode_record({"bad": object()})


def test_a_bad_record_fails_the_batch_without_writing_half_of_it(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "runs.jsonl")
    with pytest.raises(TypeError):
        log.append([{"ok": 1}, {"bad": object()}])
    assert not log.path.exists() or log.path.read_bytes() == b""
    log.close()


def test_hostile_output_cannot_break_a_record(tmp_path: Path) -> None:
    tail = (
        'line one\nline two\r\n\x1b[31mred\x1b[0m \ufffd\udcff \x00 \u2028 '
        '"}\n{"status":"succeeded","run_id":"forged"}\n'
    )
    log = JsonlLog(tmp_path / "runs.jsonl")
    log.append([{"record": "finished", "run_id": "r1", "output_tail": tail}])
    log.close()
    raw = lines(log.path)
    assert len(raw) == 1
    assert raw[0].isascii()
    records = list(read(log.path))
    assert len(records) == 1 and records[0]["output_tail"] == tail


def test_repair_drops_only_the_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    log = JsonlLog(path)
    log.append([{"run_id": "a"}, {"run_id": "b"}])
    log.close()
    good = path.read_bytes()
    torn = b'{"v":1,"ts":"2026-11-22T18:58:16.123Z","run_id":"c","sta'
    path.write_bytes(good + torn)

    log = JsonlLog(path)
    assert log.open() == len(torn)
    assert path.read_bytes() == good
    log.append([{"run_id": "d"}])
    log.close()
    stats = ReadStats()
    assert [r["run_id"] for r in read(path, stats)] == ["a", "b", "d"]
    assert stats.skipped == 0


def test_repair_edge_cases(tmp_path: Path) -> None:
    assert JsonlLog(tmp_path / "missing.jsonl").repair() == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert JsonlLog(empty).repair() == 0
    no_newline = tmp_path / "one.jsonl"
    no_newline.write_bytes(b"x" * 200_000)  # longer than one scan block
    assert JsonlLog(no_newline).repair() == 200_000
    assert no_newline.read_bytes() == b""
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b'{"a":1}\n')
    assert JsonlLog(clean).repair() == 0


def test_reader_skips_garbage_and_counts_it(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_bytes(
        b'{"run_id":"a"}\n'
        b"garbage\n"
        b"[1,2]\n"
        b"\n"
        b'\xff\xfe{"not":"utf8"\n'
        b'{"run_id":"b"}\n'
        b'{"run_id":"c","sta'
    )
    stats = ReadStats()
    assert [r["run_id"] for r in read(path, stats)] == ["a", "b"]
    assert stats.records == 2 and stats.skipped == 4
    assert list(read(tmp_path / "absent.jsonl")) == []


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "runs.jsonl")
    log.open()

    def writer(n: int) -> None:
        for i in range(50):
            log.append([{"run_id": f"{n}-{i}", "pad": "x" * 5000}] * 3, sync=False)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    log.close()
    stats = ReadStats()
    assert len(list(read(log.path, stats))) == 4 * 50 * 3
    assert stats.skipped == 0


def test_ledger_opens_both_logs_and_reports_repairs(tmp_path: Path) -> None:
    state = tmp_path / "state" / "nested"
    with Ledger(state) as ledger:
        ledger.event("center_started", pid=123)
        ledger.runs.append([{"record": "dispatched", "run_id": "r1", "job": "j"}])
    (state / "runs.jsonl").write_bytes((state / "runs.jsonl").read_bytes() + b'{"torn')
    ledger = Ledger(state)
    assert ledger.open() == {"runs": 6, "events": 0}
    events = list(ledger.read_events())
    assert events[0]["event"] == "center_started" and events[0]["pid"] == 123
    assert [v["run_id"] for v in ledger.run_views()] == ["r1"]
    ledger.close()


def test_fold_runs_merges_records_per_run() -> None:
    records: list[dict[str, Any]] = [
        {"ts": "t1", "record": "dispatched", "run_id": "a", "job": "j", "attempt": 1},
        {"ts": "t2", "record": "dispatched", "run_id": "b", "job": "k"},
        {"ts": "t3", "record": "started", "run_id": "a", "started_at": "s"},
        {"ts": "t4", "event": "agent_connected"},
        {
            "ts": "t5",
            "record": "finished",
            "run_id": "a",
            "status": "succeeded",
            "exit_code": 0,
        },
        {
            "ts": "t6",
            "record": "finished",
            "status": "missed",
            "job": "m",
            "count": 1440,
            "first_scheduled_at": "2026-11-21T00:00:00Z",
            "last_scheduled_at": "2026-11-21T23:59:00Z",
            "run_id": "m-missed-1",
        },
    ]
    views = fold_runs(records)
    assert [v["run_id"] for v in views] == ["a", "b", "m-missed-1"]
    a, b, missed = views
    assert a["dispatched_ts"] == "t1" and a["ts"] == "t5"
    assert a["record"] == "finished" and a["status"] == "succeeded"
    assert a["started_at"] == "s" and a["attempt"] == 1
    assert b["record"] == "dispatched" and "status" not in b
    assert missed["count"] == 1440 and missed["dispatched_ts"] == "t6"
