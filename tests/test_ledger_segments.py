"""The segmented ledger: rotation, sealing, the checkpoint, crash debris, upgrade of an
earlier version's state directory, retention, and queries that read only what they need."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cronfile.state import queries
from cronfile.state import segments as segments_module
from cronfile.state.checkpoint import CHECKPOINT_FILE, current_summary, load_checkpoint
from cronfile.state.ledger import Ledger, encode_record, fold_runs, iso, read_log
from cronfile.state.reports import query_runs, run_log
from cronfile.state.retention import RetentionError, parse_retention
from cronfile.state.segments import list_segments, read_bytes

DAY = 86400.0


def run_records(job: str, slot: float, status: str = "succeeded", agent: str = "local",
                attempt: int = 1, finish: bool = True) -> list[bytes]:
    """The lines one scheduled run writes, in today's format, timed at its slot."""
    run_id = f"{job}-{slot:.0f}-{attempt}"
    base = {"run_id": run_id, "job": job, "agent": agent, "transport": "local",
            "scheduled_at": iso(slot), "attempt": attempt,
            "revision": {"content_hash": "abc", "git_commit": None}}
    lines = [encode_record({**base, "record": "dispatched"}, iso(slot)),
             encode_record({**base, "record": "started", "started_at": iso(slot + 0.1),
                            "pid": 42}, iso(slot + 0.1))]
    if finish:
        lines.append(encode_record({
            **base, "record": "finished", "status": status,
            "exit_code": 0 if status == "succeeded" else 1, "signal": None,
            "started_at": iso(slot + 0.1), "finished_at": iso(slot + 1.5), "duration_s": 1.4,
            "output_tail": f"output of {run_id}\n"}, iso(slot + 1.5)))
    return lines


def history(start: float, count: int, step: float = 60.0, jobs: tuple[str, ...] = ("a", "b")
            ) -> bytes:
    out = []
    for i in range(count):
        job = jobs[i % len(jobs)]
        out.extend(run_records(job, start + i * step, "failed" if i % 7 == 0 else "succeeded"))
    return b"".join(out)


def all_runs(state: Path) -> list[dict[str, Any]]:
    return list(read_log(state, "runs"))


# ---------------------------------------------------------------------- rotation and sealing


def test_rotation_by_size_keeps_every_record_in_order(tmp_path: Path) -> None:
    data = history(time.time() - DAY, 300)
    with Ledger(tmp_path, segment_bytes=8 * 1024) as ledger:
        for line in data.splitlines(keepends=True):
            ledger.write_runs(line, sync=False)
    segments = list_segments(tmp_path, "runs")
    assert len(segments) >= 10 and all(s.sealed and s.compressed for s in segments)
    assert [s.seq for s in segments] == list(range(1, len(segments) + 1))
    assert sum(s.count or 0 for s in segments) + len((tmp_path / "runs.jsonl").read_bytes()
                                                      .splitlines()) == 900
    assert [json.dumps(r) for r in all_runs(tmp_path)] == [
        json.dumps(json.loads(line)) for line in data.splitlines()]
    # the names bound their records' times: every record's ts is inside its segment's range
    for segment in segments:
        for line in read_bytes(segment).splitlines():
            ts = json.loads(line)["ts"][:19] + "Z"
            assert segment.lo is not None and segment.hi is not None
            assert segment.lo <= ts <= segment.hi


def test_a_log_holding_an_earlier_day_is_rotated_at_the_next_write(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        ledger.event("center_started")
        ledger.events.day = "2000-01-01"  # as if the file's first record were that old
        ledger.event("center_stopped")
    segments = list_segments(tmp_path, "events")
    assert len(segments) == 1 and segments[0].count == 2
    assert [e["event"] for e in read_log(tmp_path, "events")] == ["center_started",
                                                                   "center_stopped"]
    assert (tmp_path / "events.jsonl").read_bytes() == b""  # the new current file, empty


def test_a_part_that_would_not_shrink_stays_plain(tmp_path: Path) -> None:
    plain = tmp_path / "runs.000009.jsonl"
    noise = [os.urandom(400).replace(b"\n", b" ") + b"\n" for _ in range(3)]
    plain.write_bytes(b"".join(noise))
    parsed = segments_module.parse_name(plain)
    assert parsed is not None
    [part] = segments_module.seal(parsed, 1 << 20)
    assert not part.compressed and part.path.name.endswith(".n3.jsonl")
    assert read_bytes(part) == b"".join(noise) and not plain.exists()


# ---------------------------------------------------------------------- the checkpoint


def test_the_checkpoint_knows_what_a_restart_needs(tmp_path: Path) -> None:
    now = time.time()
    data = history(now - 2 * DAY, 400)
    open_run = b"".join(run_records("a", now - 120, finish=False))
    failed = b"".join(run_records("b", now - 60, status="failed"))
    with Ledger(tmp_path, segment_bytes=16 * 1024) as ledger:
        for line in (data + open_run + failed).splitlines(keepends=True):
            ledger.write_runs(line, sync=False)
        ledger.event("revision_rejected", errors=["a.yaml:1:1: error: bad"])
    ledger = Ledger(tmp_path, segment_bytes=16 * 1024)
    ledger.open()
    summary = ledger.recover()
    ledger.close()
    assert list(summary.open_runs) == [f"a-{now - 120:.0f}-1"]
    assert summary.open_runs[f"a-{now - 120:.0f}-1"]["record"] == "started"
    assert summary.jobs["b"]["last"]["status"] == "failed"
    assert summary.jobs["a"]["last_success"] is not None
    assert summary.rejection is not None and summary.rejection["errors"] == [
        "a.yaml:1:1: error: bad"]
    # slots: only the recent ones (6 h before the newest record), with the failed attempt
    key = f"b\x00{iso(now - 60)}\x00local"
    assert summary.slots[key][0] == 1 and summary.slots[key][1]["status"] == "failed"
    assert all(v[2] >= iso(now - 60 - 6 * 3600 - 2) for v in summary.slots.values())  # type: ignore[operator]
    assert len(summary.slots) < 400
    # losing the checkpoint loses nothing: it is rebuilt from the segments, identical
    rebuilt_from = json.dumps(summary.to_json(), sort_keys=True)
    (tmp_path / CHECKPOINT_FILE).unlink()
    again = current_summary(tmp_path)
    assert json.dumps(again.to_json(), sort_keys=True) == rebuilt_from
    (tmp_path / CHECKPOINT_FILE).write_bytes(b'{"v": 1, "posit')  # torn: ignored, rebuilt
    assert json.dumps(current_summary(tmp_path).to_json(), sort_keys=True) == rebuilt_from


def test_start_reads_only_the_checkpoint_and_the_current_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Ledger(tmp_path, segment_bytes=8 * 1024) as ledger:
        for line in history(time.time() - DAY, 200).splitlines(keepends=True):
            ledger.write_runs(line, sync=False)
    assert len(list_segments(tmp_path, "runs")) > 5
    opened: list[str] = []
    real = segments_module.read_bytes

    def spy(segment: Any) -> bytes:
        opened.append(str(segment))
        return real(segment)

    monkeypatch.setattr("cronfile.state.checkpoint.read_bytes", spy)
    with Ledger(tmp_path, segment_bytes=8 * 1024) as ledger:
        assert ledger.recover().records["runs"] == 600
    assert opened == []


# ---------------------------------------------------------------------- crashes


def test_a_crash_after_the_rename_is_sealed_at_the_next_start(tmp_path: Path) -> None:
    data = history(time.time() - DAY, 50)
    (tmp_path / "runs.000001.jsonl").write_bytes(data + b'{"record": "dispa')  # torn tail
    with Ledger(tmp_path, segment_bytes=1 << 20) as ledger:
        summary = ledger.recover()
    assert summary.records["runs"] == 150 and summary.skipped == 0
    segments = list_segments(tmp_path, "runs")
    assert len(segments) == 1 and segments[0].sealed and segments[0].count == 150
    assert not (tmp_path / "runs.000001.jsonl").exists()


def test_a_crash_inside_a_seal_is_redone_whole(tmp_path: Path) -> None:
    data = history(time.time() - DAY, 100)
    plain = tmp_path / "runs.000001.jsonl"
    plain.write_bytes(data)
    segment = segments_module.parse_name(plain)
    assert segment is not None
    parts = segments_module.seal(segment, 4096)
    assert len(parts) > 3
    # put the world back as a crash after two parts left it: marker, two parts, the plain file
    for part in parts[2:]:
        part.path.unlink()
    plain.write_bytes(data)
    (tmp_path / ".runs.000001.sealing").write_bytes(b"")
    (tmp_path / (parts[2].path.name + ".tmp")).write_bytes(b"half a part")
    with Ledger(tmp_path, segment_bytes=4096) as ledger:
        assert ledger.recover().records["runs"] == 300
    assert sorted(os.listdir(tmp_path)) == sorted(
        [p.path.name for p in parts] + ["runs.jsonl", "events.jsonl", CHECKPOINT_FILE])
    assert len(all_runs(tmp_path)) == 300


def test_a_crash_before_the_plain_file_is_dropped_keeps_the_parts(tmp_path: Path) -> None:
    data = history(time.time() - DAY, 100)
    plain = tmp_path / "runs.000001.jsonl"
    plain.write_bytes(data)
    segment = segments_module.parse_name(plain)
    assert segment is not None
    segments_module.seal(segment, 4096)
    plain.write_bytes(data)  # the unlink that did not happen
    with Ledger(tmp_path, segment_bytes=4096) as ledger:
        assert ledger.recover().records["runs"] == 300
    assert not plain.exists() and len(all_runs(tmp_path)) == 300


def test_a_damaged_compressed_part_yields_its_whole_lines(tmp_path: Path) -> None:
    plain = tmp_path / "runs.000001.jsonl"
    plain.write_bytes(history(time.time() - DAY, 200))
    segment = segments_module.parse_name(plain)
    assert segment is not None
    [part] = segments_module.seal(segment, 1 << 20)
    packed = part.path.read_bytes()
    part.path.write_bytes(packed[: len(packed) * 2 // 3])
    data = read_bytes(list_segments(tmp_path, "runs")[0])
    assert data.endswith(b"\n") and 0 < data.count(b"\n") < 600
    assert all(json.loads(line) for line in data.splitlines())


# ---------------------------------------------------------------------- upgrade


def test_an_earlier_versions_big_runs_jsonl_is_taken_over_without_losing_a_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = history(time.time() - 10 * DAY, 3000, step=240)
    (tmp_path / "runs.jsonl").write_bytes(data)
    (tmp_path / "events.jsonl").write_bytes(encode_record({"event": "center_started"}))
    before = [json.loads(line) for line in data.splitlines()]
    before_views = fold_runs(before)
    with caplog.at_level(logging.WARNING, "cronfile.ledger"), \
            Ledger(tmp_path, segment_bytes=32 * 1024) as ledger:
        summary = ledger.recover()
    assert "rotating it into segments" in caplog.text and "taking over runs.000001.jsonl" in caplog.text
    assert summary.records["runs"] == 9000
    segments = list_segments(tmp_path, "runs")
    assert len(segments) > 20 and {s.seq for s in segments} == {1}
    after = all_runs(tmp_path)
    assert len(after) == len(before) and after[::97] == before[::97] and after == before
    # every old run answers through the query, in the §4 shape
    views = query_runs(tmp_path, limit=None)
    assert len(views) == len(before_views) == 3000
    sample = {v["run_id"]: v for v in before_views[::250]}
    got = {v["run_id"]: v for v in views if v["run_id"] in sample}
    for run_id, view in sample.items():
        assert {k: got[run_id][k] for k in view} == view
    # a later start is fast: nothing left to fold but the (empty) current file
    assert load_checkpoint(tmp_path) is not None
    assert (tmp_path / "runs.jsonl").read_bytes() == b""


# ---------------------------------------------------------------------- retention


def _aged_ledger(tmp_path: Path, open_in_day: int | None = None) -> None:
    """Ten daily segments, 10 to 1 days old (plus one run left open in one of them)."""
    now = time.time()
    with Ledger(tmp_path) as ledger:
        for day in range(10, 0, -1):
            lines = history(now - day * DAY, 20, step=30)
            if open_in_day == day:
                lines += b"".join(run_records("c", now - day * DAY + 900, finish=False))
            ledger.write_runs(lines)
            ledger._rotate("runs")  # noqa: SLF001 - the rotation a day change makes
        ledger.drain()


def test_retention_removes_old_segments_oldest_first_and_says_so(tmp_path: Path) -> None:
    _aged_ledger(tmp_path)
    assert len(list_segments(tmp_path, "runs")) == 10
    with Ledger(tmp_path, retention_s=parse_retention("4d"), retention_text="4d"):
        pass
    left = list_segments(tmp_path, "runs")
    assert [s.seq for s in left] == [7, 8, 9, 10]  # 4, 3, 2 and 1 days old
    [event] = [e for e in read_log(tmp_path, "events") if e.get("event") == "retention"]
    assert event["log"] == "runs" and event["records"] == 6 * 60
    assert event["from"] == iso_second(time.time() - 10 * DAY)[:14] + event["from"][14:]
    assert len(event["segments"]) == 6 and event["to"] < left[0].lo  # type: ignore[operator]
    assert len(all_runs(tmp_path)) == 4 * 60


def iso_second(epoch: float) -> str:
    return str(iso(epoch))[:19] + "Z"


def test_retention_never_removes_a_segment_holding_an_open_run(tmp_path: Path) -> None:
    _aged_ledger(tmp_path, open_in_day=8)
    with Ledger(tmp_path, retention_s=parse_retention("2d"), retention_text="2d"):
        pass
    assert [s.seq for s in list_segments(tmp_path, "runs")][0] == 3  # 8 days old stays
    with Ledger(tmp_path, retention_s=None):  # forever
        pass
    assert len(list_segments(tmp_path, "runs")) == 8


def test_retention_values() -> None:
    assert parse_retention("90d") == 90 * DAY and parse_retention("forever") is None
    assert parse_retention("12h") == 12 * 3600 and parse_retention("2w") == 14 * DAY
    for bad in ("", "90", "-1d", "0d", "soon"):
        with pytest.raises(RetentionError, match="--retention"):
            parse_retention(bad)


# ---------------------------------------------------------------------- queries


def _query_ledger(tmp_path: Path) -> list[bytes]:
    data = history(time.time() - 5 * DAY, 2000, step=216, jobs=("a", "b", "c", "rare"))
    with Ledger(tmp_path, segment_bytes=24 * 1024) as ledger:
        for line in data.splitlines(keepends=True):
            ledger.write_runs(line, sync=False)
    return data.splitlines()


def test_runs_newest_first_match_the_full_fold(tmp_path: Path) -> None:
    lines = _query_ledger(tmp_path)
    views = fold_runs(json.loads(line) for line in lines)
    for job, status, limit in (("a", None, 20), (None, "failed", 5), (None, None, 50),
                               ("rare", "succeeded", 3), ("nope", None, 10)):
        want = [v for v in views if (job is None or v["job"] == job)
                and (status is None or v["status"] == status)][-limit:]
        got = query_runs(tmp_path, job, status, limit=limit)
        assert [v["run_id"] for v in got] == [v["run_id"] for v in want]
        assert all(g["dispatched_ts"] == w["dispatched_ts"] and g["status"] == w["status"]
                   for g, w in zip(got, want, strict=True))


def test_a_limited_query_reads_only_the_newest_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _query_ledger(tmp_path)
    read: list[int] = []
    real = segments_module.read_bytes

    def spy(segment: Any) -> bytes:
        read.append(segment.seq)
        return real(segment)

    monkeypatch.setattr(queries, "read_bytes", spy)
    assert len(query_runs(tmp_path, "a", limit=20)) == 20
    seqs = [s.seq for s in list_segments(tmp_path, "runs")]
    # 20 runs of one job in four: ~80 runs, three segments' worth, read newest first
    assert read == seqs[::-1][:len(read)] and 0 < len(read) <= 4 < len(seqs) // 10


def test_a_window_reads_only_the_segments_that_overlap_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _query_ledger(tmp_path)
    segments = list_segments(tmp_path, "runs")
    since, until = time.time() - 3 * DAY, time.time() - 3 * DAY + 3600
    views = fold_runs(json.loads(line) for line in lines)

    def key(v: dict[str, Any]) -> float:
        from cronfile.schedules.nexttimes import parse_time
        return parse_time(v["scheduled_at"])

    want = [v["run_id"] for v in views if since <= key(v) <= until]
    read: list[int] = []
    real = segments_module.read_bytes
    monkeypatch.setattr(queries, "read_bytes", lambda s: read.append(s.seq) or real(s))
    got = query_runs(tmp_path, since=iso(since), until=iso(until), limit=None)
    assert [v["run_id"] for v in got] == want and len(want) >= 10
    assert len(segments) > 15 and 0 < len(set(read)) <= 4


def test_logs_gives_a_runs_records_and_output_tail(tmp_path: Path) -> None:
    _query_ledger(tmp_path)
    some = query_runs(tmp_path, "b", limit=200)[0]
    entry = run_log(tmp_path, some["run_id"])
    assert entry is not None
    assert [r["record"] for r in entry["records"]] == ["dispatched", "started", "finished"]
    assert entry["output_tail"] == f"output of {some['run_id']}\n"
    assert run_log(tmp_path, "no-such-run") is None


def test_status_summary_reads_checkpoint_and_tail(tmp_path: Path) -> None:
    lines = _query_ledger(tmp_path)
    summary = current_summary(tmp_path)
    last_b = [json.loads(line) for line in lines if b'"job":"b"' in line][-1]
    assert summary.jobs["b"]["last"]["run_id"] == last_b["run_id"]
    assert summary.records["runs"] == len(lines)


# ---------------------------------------------------------------------- the writer thread


def test_writes_submitted_to_the_writer_thread_land_in_order(tmp_path: Path) -> None:
    import threading

    with Ledger(tmp_path, segment_bytes=4096) as ledger:
        threads: set[str] = set()

        def write(i: int) -> None:
            threads.add(threading.current_thread().name)
            ledger.append_runs([{"record": "dispatched", "run_id": f"r{i}", "job": "j"}])

        futures = [ledger.submit(write, i) for i in range(200)]
        for future in futures:
            future.result(timeout=10)
        assert threads == {t for t in threads if t.startswith("ledger-writer")}
    assert [r["run_id"] for r in all_runs(tmp_path)] == [f"r{i}" for i in range(200)]


# ---------------------------------------------------------------------- the commands


def test_logs_and_runs_commands_on_a_segmented_ledger(tmp_path: Path) -> None:
    from centerlib import cli

    _query_ledger(tmp_path)
    newest = query_runs(tmp_path, "a", limit=1)[0]
    out = cli("logs", newest["run_id"], state=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"run {newest['run_id']} of a"
    assert out.stdout.endswith(f"--- output tail ({len(newest['output_tail'])} chars) ---\n"
                               f"{newest['output_tail']}")
    as_json = json.loads(cli("logs", newest["run_id"], "--format", "json", state=tmp_path).stdout)
    assert [r["record"] for r in as_json["records"]] == ["dispatched", "started", "finished"]
    missing = cli("logs", "nope", state=tmp_path)
    assert missing.returncode == 1 and "no run nope in the ledger" in missing.stderr
    since, until = iso(time.time() - 3 * DAY), iso(time.time() - 3 * DAY + 3600)
    window = cli("runs", "--since", str(since), "--until", str(until), "--limit", "0",
                 "--format", "json", state=tmp_path)
    assert window.returncode == 0
    assert [v["run_id"] for v in json.loads(window.stdout)] == [
        v["run_id"] for v in query_runs(tmp_path, since=since, until=until, limit=None)]
    bad = cli("runs", "--until", "someday", state=tmp_path)
    assert bad.returncode == 2 and "--until" in bad.stderr and "Traceback" not in bad.stderr


def test_a_retention_shorter_than_a_jobs_reach_is_explained() -> None:
    from cronfile.schedules.model import CatchUp, Expect, Job, Retries
    from cronfile.state.retention import check_retention

    jobs = [Job(name="weekly", command="true", schedules=("0 3 * * 1",), catch_up=CatchUp.LATEST),
            Job(name="watched", command="true", schedules=("* * * * *",),
                expect=Expect(success_within_s=10 * DAY)),
            Job(name="retried", command="true", schedules=("* * * * *",),
                retries=Retries(max=3, backoff_s=3600, factor=4), timeout_s=600),
            Job(name="plain", command="true", schedules=("* * * * *",))]
    now = time.time()
    message = check_retention(parse_retention("5d"), "5d", jobs, now)
    assert message is not None
    assert message.splitlines() == [
        "--retention 5d is shorter than some jobs need the ledger:",
        "  job watched: expect.success_within reaches 10d back",
        "  job weekly: catch_up: latest reaches 7d back",
        "use a longer --retention (or 'forever')",
    ]
    assert "retried" not in message  # 1 h + 4 h + 16 h + 4 x 10 min < 5 days
    assert check_retention(parse_retention("10d"), "10d", jobs, now) is None
    assert check_retention(None, "forever", jobs, now) is None
    short = check_retention(parse_retention("12h"), "12h", jobs, now)
    assert short is not None and "  job retried: its retries reaches 21.7h back" in short


def test_the_checkpoint_follows_the_current_file_every_few_megabytes(tmp_path: Path) -> None:
    from cronfile.state.ledger import CHECKPOINT_EVERY_BYTES

    data = history(time.time() - DAY, 4000)
    assert len(data) > CHECKPOINT_EVERY_BYTES
    ledger = Ledger(tmp_path, segment_bytes=64 * 1024 * 1024)
    ledger.open()
    for i in range(0, len(data), 64 * 1024):
        chunk = data[i:i + 64 * 1024]
        ledger.write_runs(chunk, sync=False)
    ledger.drain()
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None
    generation, offset = checkpoint.position["runs"]
    assert generation == 1 and CHECKPOINT_EVERY_BYTES - 2000 <= offset <= len(data)
    assert checkpoint.records["runs"] == data[:offset].count(b"\n")
    ledger.close()
    final = load_checkpoint(tmp_path)
    assert final is not None and final.position["runs"] == [1, len(data)]
    assert final.records["runs"] == 12000


def test_segments_and_the_checkpoint_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Rotated segments hold output tails like runs.jsonl: 0600 too (issue 11, finding 8)."""
    old = os.umask(0o022)
    try:
        data = history(time.time() - DAY, 300)
        with Ledger(tmp_path, segment_bytes=8 * 1024) as ledger:
            for line in data.splitlines(keepends=True):
                ledger.write_runs(line, sync=False)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert len(list_segments(tmp_path, "runs")) >= 10
    assert (tmp_path / CHECKPOINT_FILE) in files
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: "0o600" for p in files}
