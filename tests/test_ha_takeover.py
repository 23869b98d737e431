"""A takeover's PostgreSQL side, against a real server (SPEC §9 "Takeover", "Records"):
what the new leader reads, the same pure recovery a restart uses, one final record per
run across centers, and claims that never count another leader's row as ours."""

from __future__ import annotations

import asyncio
import json
import sys
from concurrent.futures import TimeoutError as FuturesTimeout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cronfile.center.recovery import RequeueRetry, RequeueTrigger, pending_starts, recover
from cronfile.ha import lease as lease_sql
from cronfile.ha.claims import Claim, claim_slots
from cronfile.ha.runrecords import RunRecordStore, insert_run_records
from cronfile.ha.takeover import read_takeover_ledger
from cronfile.state.ledger import fold_runs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pglib import BlackholeProxy, PgServer, skip_reason  # noqa: E402

_reason = skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

NOW = datetime.now(UTC).replace(microsecond=0)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def rec(run_id: str, record: str, at: datetime, slot: datetime, attempt: int = 1,
        transport: str = "local", **fields: Any) -> dict[str, Any]:
    return {"v": 1, "ts": iso(at), "run_id": run_id, "job": run_id.split(".")[0],
            "agent": "web1" if transport == "tcp" else "local", "transport": transport,
            "scheduled_at": iso(slot), "attempt": attempt, "revision": {}, "record": record,
            **fields}


def final(run_id: str, status: str, at: datetime, slot: datetime, attempt: int = 1,
          **fields: Any) -> dict[str, Any]:
    return rec(run_id, "finished", at, slot, attempt, status=status, exit_code=0 if
               status == "succeeded" else 1, finished_at=iso(at), **fields)


def insert(dsn: str, center: str, records: list[dict[str, Any]]) -> list[bool]:
    async def go() -> list[bool]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await insert_run_records(conn, center, 1, records)

    return asyncio.run(go())


def test_a_takeover_reads_the_gap_and_what_is_still_open_and_recovers_as_a_restart(dsn: str) -> None:
    m = timedelta(minutes=1)
    old = NOW - 90 * m  # before the gap, inside the horizon
    records = [
        # long done: neither in the gap nor open nor a retry -> not read
        rec("done.1", "dispatched", old, old), final("done.1", "succeeded", old + m, old),
        # a local run dispatched an hour ago, still open: the old leader's, now lost
        rec("long.1", "dispatched", old, old), rec("long.1", "started", old, old, started_at=iso(old)),
        # an agent's run still open: awaited, not lost
        rec("agent.1", "dispatched", old, old, transport="tcp"),
        # failed before the gap, its retry (attempt 2) never dispatched: requeued
        final("flaky.1", "failed", NOW - 5 * m, NOW - 6 * m),
        # failed, and its retry already ran: nothing to requeue
        final("fixed.1", "failed", old, old), final("fixed.2", "succeeded", old + m, old, attempt=2),
        # in the gap: a handled slot, and one whose started copy landed after its final
        final("gap.1", "succeeded", NOW - 5 * timedelta(seconds=1), NOW - 6 * timedelta(seconds=1)),
        final("late.1", "succeeded", NOW - 4 * timedelta(seconds=1), NOW - 5 * timedelta(seconds=1)),
        rec("late.1", "started", NOW - 4 * timedelta(seconds=1), NOW - 5 * timedelta(seconds=1)),
        # a triggered start that ran long ago: its event must not start it again
        final("trig.1", "succeeded", old + m, old, trigger="trigger"),
        # older than the horizon: never read, even open
        rec("ancient.1", "dispatched", NOW - 30 * 60 * m, NOW - 30 * 60 * m),
    ]
    assert all(insert(dsn, "a", records))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for due in ({"trig": iso(old)}, {"later": iso(NOW + m)}):
            conn.execute("INSERT INTO cronfile_records (kind, ts, center, body) VALUES ('event',"
                         " now(), 'a', %s)", (json.dumps({"event": "triggered", "due": due}),))

    async def read() -> Any:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await read_takeover_ledger(conn, (NOW - 20 * timedelta(seconds=1)).timestamp(),
                                              (NOW - 6 * 60 * m).timestamp())

    got = asyncio.run(read())
    assert sorted({r["run_id"] for r in got.runs}) == [
        "agent.1", "fixed.1", "fixed.2", "flaky.1", "gap.1", "late.1", "long.1", "trig.1"]
    assert [e["due"] for e in got.triggered] == [{"trig": iso(old)}, {"later": iso(NOW + m)}]
    assert got.last_success == {"done": (old + m).timestamp(), "fixed": (old + m).timestamp(),
                                "gap": (NOW - 5 * timedelta(seconds=1)).timestamp(),
                                "late": (NOW - 4 * timedelta(seconds=1)).timestamp(),
                                "trig": (old + m).timestamp()}

    found = recover(fold_runs(got.runs), lambda v: f"center {v['center']} stopped leading")
    assert [(r["run_id"], r["status"], r["reason"], r["started_at"]) for r in found.lost] == [
        ("long.1", "lost", "center a stopped leading", iso(old))]
    assert list(found.awaiting_agents) == ["agent.1"]
    assert ("gap", round((NOW - 6 * timedelta(seconds=1)).timestamp(), 3), "local") in found.done_slots
    pending = pending_starts(found, got.triggered, (NOW - 6 * 60 * m).timestamp(), lambda job: True)
    assert [(s.job, s.attempt) for s in pending if isinstance(s, RequeueRetry)] == [("flaky", 1)]
    assert [(s.job, s.due) for s in pending if isinstance(s, RequeueTrigger)] == [
        ("later", (NOW + m).timestamp())]


def test_a_run_gets_one_final_record_whichever_center_writes_first(dsn: str) -> None:
    slot = NOW - timedelta(minutes=1)
    started = rec("job.1", "started", NOW, slot)
    lost = final("job.1", "lost", NOW, slot)
    real = final("job.1", "succeeded", NOW, slot)
    assert insert(dsn, "b", [lost]) == [True]  # the new leader recorded it lost first
    # the old leader's own records come later: its started is kept, its final refused
    assert insert(dsn, "a", [started, real]) == [True, False]
    assert insert(dsn, "b", [lost]) == [True]  # b sending it again: still b's, not added twice
    superseding = {**real, "supersedes": "lost"}
    assert insert(dsn, "b", [superseding]) == [True]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT center, body->>'status', body ? 'supersedes' FROM cronfile_records"
                            " WHERE body->>'record' = 'finished' ORDER BY seq").fetchall()
    assert rows == [("b", "lost", False), ("b", "succeeded", True)]


def test_two_centers_racing_to_finish_the_same_runs_write_one_final_each(dsn: str) -> None:
    """Without the advisory lock both inserts' NOT EXISTS see an empty table and both win."""
    slot = NOW - timedelta(minutes=1)
    batches = {name: [final(f"race.{i}", status, NOW, slot) for i in range(1, 201)]
               for name, status in (("a", "succeeded"), ("b", "lost"))}

    async def race() -> dict[str, list[bool]]:
        conns = {n: await psycopg.AsyncConnection.connect(dsn, autocommit=True) for n in batches}
        try:
            for conn in conns.values():
                await conn.execute("SELECT 1")
            kept = await asyncio.gather(*(insert_run_records(conns[n], n, 1, batches[n])
                                          for n in batches))
            return dict(zip(batches, kept, strict=True))
        finally:
            for conn in conns.values():
                await conn.close()

    kept = asyncio.run(race())
    assert [a != b for a, b in zip(kept["a"], kept["b"], strict=True)] == [True] * 200
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT run_id) FROM cronfile_records").fetchone() \
            == (200, 200)


def test_a_batch_sent_again_after_a_lost_reply_adds_nothing_and_is_still_ours(dsn: str) -> None:
    slot = NOW - timedelta(minutes=1)
    batch = [rec("z.1", "started", NOW, slot), final("z.1", "succeeded", NOW, slot)]
    assert insert(dsn, "a", batch) == [True, True]
    assert insert(dsn, "a", batch) == [True, True]  # the retry: ours, and not added again
    assert insert(dsn, "b", batch[1:]) == [False]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM cronfile_records").fetchone() == (2,)


def test_the_store_keeps_a_centers_order_and_reports_what_it_refused(dsn: str) -> None:
    slot = NOW - timedelta(minutes=1)
    insert(dsn, "b", [final("x.1", "lost", NOW, slot)])
    store = RunRecordStore(dsn, "a", lambda: 1)
    try:
        first = store.submit([rec("x.1", "started", NOW, slot), final("x.1", "succeeded", NOW, slot),
                              rec("y.1", "started", NOW, slot)])
        second = store.submit([final("y.1", "failed", NOW, slot)])
        assert first.result(10) == [True, False, True]
        assert second.result(10) == [True]
        assert store.refused == 1
    finally:
        store.close()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT run_id, body->>'record', center FROM cronfile_records"
                            " ORDER BY seq").fetchall()
    assert rows == [("x.1", "finished", "b"), ("x.1", "started", "a"), ("y.1", "started", "a"),
                    ("y.1", "finished", "a")]


def test_a_new_leader_never_counts_the_old_leaders_claim_of_the_same_run_id_as_its_own(dsn: str) -> None:
    """Run ids are deterministic: both leaders name a local job's slot the same way."""
    slot = NOW + timedelta(minutes=5)
    body = {"record": "dispatched", "run_id": "tick-slot", "job": "tick"}
    same = [Claim(job="tick", scheduled_at=slot, target="", run_id="tick-slot", dispatched=body)]

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            ttl = timedelta(seconds=30)
            assert (await lease_sql.acquire(conn, "a", ttl)).won
            assert await claim_slots(conn, "a", 1, same) == {"tick-slot"}
            await conn.execute("UPDATE cronfile_lease SET expires_at = now() - interval '7 s'")
            grant = await lease_sql.acquire(conn, "b", ttl)
            assert grant.won and grant.lease.term == 2
            assert grant.previous_expires_at is not None
            lapse = (grant.lease.db_now - grant.previous_expires_at).total_seconds()
            assert 7.0 <= lapse < 9.0
            assert await claim_slots(conn, "b", 2, same) == set()

    asyncio.run(scenario())


def test_a_silent_connection_is_given_up_and_close_returns(pg: PgServer, dsn: str) -> None:
    """A partition (no RST, no FIN) must not hang the store: every try is bounded, so the
    center can still stop; what never reached the table is not reported as written."""
    database = dsn.rsplit("/", 1)[1]
    proxy = BlackholeProxy(pg.port)
    store = RunRecordStore(pg.dsn(database, port=proxy.port), "a", lambda: 1, timeout_s=1.0)
    slot = NOW - timedelta(minutes=1)
    try:
        assert store.submit([rec("p.1", "started", NOW, slot)]).result(10) == [True]
        proxy.blackhole()
        pending = store.submit([final("p.1", "succeeded", NOW, slot)])
        with pytest.raises(FuturesTimeout):
            pending.result(2.5)  # tried, timed out, tried again: still waiting
        store.close(timeout=0.5)
        assert pending.done() and pending.exception() is not None
    finally:
        proxy.close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT body->>'record' FROM cronfile_records").fetchall() == [("started",)]
