"""HA against a real PostgreSQL (SPEC §9): migrations, the lease, claims, step-down, restarts.

The server is started by the fixture (tests/pglib.py); every test gets a fresh database.
Timings are shortened (lease of a few seconds) but the code paths are the production ones.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cronfile.ha import lease as lease_sql
from cronfile.ha.claims import SLOT_TARGET, Claim, Claimer, claim_slots, fetch_records
from cronfile.ha.elector import Elector, Role
from cronfile.ha.migrations import MIGRATIONS, applied_versions, migrate
from cronfile.ha.settings import HaSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pglib import BlackholeProxy, PgServer, skip_reason  # noqa: E402

_reason = skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


def claim(job: str, minute: int, target: str = SLOT_TARGET, run_id: str | None = None) -> Claim:
    slot = T0 + timedelta(minutes=minute)
    rid = run_id or f"{job}-{minute}-{target or 'slot'}"
    body = {"v": 1, "record": "dispatched", "run_id": rid, "job": job, "scheduled_at": slot.isoformat()}
    return Claim(job=job, scheduled_at=slot, target=target, run_id=rid, dispatched=body)


async def expire_now(dsn: str) -> None:
    """Stand-in for time passing: the lease's expiry moves into the database's past."""
    async with await connect(dsn) as conn:
        await conn.execute("UPDATE cronfile_lease SET expires_at = now() - interval '1 ms'")


async def wait_until(predicate: Any, timeout: float) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


# -- migrations -------------------------------------------------------------------------------


def test_two_centers_migrating_together_apply_each_version_once(pg: PgServer) -> None:
    database = pg.new_database()
    barrier = threading.Barrier(4)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def start_center() -> None:
        try:
            with psycopg.connect(database, autocommit=True) as conn:
                barrier.wait()
                results.append(migrate(conn))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start_center) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    every = [m.version for m in MIGRATIONS]
    assert sorted(results) == [[], [], [], every]
    with psycopg.connect(database) as conn:
        assert applied_versions(conn) == every
        assert migrate(conn) == []


# -- the lease --------------------------------------------------------------------------------


def test_racing_holders_exactly_one_leads_and_term_grows_by_one_per_takeover(dsn: str) -> None:
    async def race(round_no: int) -> list[lease_sql.Grant]:
        conns = [await connect(dsn) for _ in range(6)]
        try:
            return list(await asyncio.gather(*(
                lease_sql.acquire(c, f"center-{i}-r{round_no}", timedelta(seconds=30))
                for i, c in enumerate(conns)
            )))
        finally:
            for c in conns:
                await c.close()

    async def scenario() -> None:
        for round_no in range(1, 6):
            grants = await race(round_no)
            winners = [g for g in grants if g.won]
            assert len(winners) == 1
            assert {g.lease.term for g in grants} == {round_no}
            assert {g.lease.holder for g in grants} == {winners[0].lease.holder}
            # A live lease cannot be taken, not even by a racer that lost a moment ago.
            assert [g.won for g in await race(round_no)] == [False] * 6
            await expire_now(dsn)

    run(scenario())


def test_renew_only_by_the_holder_with_its_term(dsn: str) -> None:
    async def scenario() -> None:
        async with await connect(dsn) as conn:
            ttl = timedelta(seconds=30)
            assert (await lease_sql.acquire(conn, "a", ttl)).won
            assert await lease_sql.renew(conn, "b", 1, ttl) is None
            assert await lease_sql.renew(conn, "a", 2, ttl) is None
            renewed = await lease_sql.renew(conn, "a", 1, ttl)
            assert renewed is not None and renewed.term == 1 and not renewed.expired
            await expire_now(dsn)
            assert (await lease_sql.acquire(conn, "b", ttl)).lease.term == 2
            assert await lease_sql.renew(conn, "a", 1, ttl) is None  # a stale leader can't renew
            assert not await lease_sql.release(conn, "a", 1)  # nor release b's lease

    run(scenario())


def settings(dsn: str, name: str, **kw: float) -> HaSettings:
    values = {"lease_s": 3.0, "renew_deadline_s": 2.0, "renew_interval_s": 0.3, "connect_timeout_s": 2.0}
    values.update(kw)
    return HaSettings(dsn=dsn, name=name, **values)


def test_settings_refuse_a_renew_deadline_not_shorter_than_the_lease() -> None:
    message = r"--ha-renew-deadline \(15s\) must be shorter than --ha-lease \(15s\)"
    with pytest.raises(ValueError, match=message):
        HaSettings(dsn="postgresql://x", name="a", lease_s=15, renew_deadline_s=15)


def test_standby_takes_over_when_the_leader_dies_without_releasing(dsn: str) -> None:
    events: list[dict[str, Any]] = []

    async def scenario() -> None:
        a = Elector(settings(dsn, "a"), events.append)
        a_task = asyncio.create_task(a.run())
        await wait_until(a.is_leading, 5)
        b = Elector(settings(dsn, "b"), events.append)
        b_task = asyncio.create_task(b.run())
        await asyncio.sleep(0.5)  # several standby retries: b must not lead while a renews
        assert not b.is_leading() and b.view().lease_holder == "a"
        a_task.cancel()  # "SIGKILL": no release, no more renews
        with pytest.raises(asyncio.CancelledError):
            await a_task
        await wait_until(b.is_leading, 3.0 + 2.0)
        assert b.term == 2
        view = b.view().as_json()
        assert view["role"] == "leader" and view["lease_holder"] == "b" and view["term"] == 2
        await b.stop()
        await b_task

    run(scenario())
    assert [(e["event"], e["center"], e["term"]) for e in events] == [
        ("leader_acquired", "a", 1),
        ("leader_acquired", "b", 2),
        ("leader_released", "b", 2),
    ]


def test_planned_stop_releases_and_a_standby_leads_within_a_second(dsn: str) -> None:
    """The standby's retry interval (5 s) and the lease (20 s) are both far longer than the
    second allowed, so only the release NOTIFY can wake it in time."""
    events: list[dict[str, Any]] = []
    slow = {"lease_s": 20.0, "renew_deadline_s": 15.0, "renew_interval_s": 5.0}

    async def scenario() -> None:
        a = Elector(settings(dsn, "a", **slow), events.append)
        a_task = asyncio.create_task(a.run())
        await wait_until(a.is_leading, 5)
        b = Elector(settings(dsn, "b", **slow), events.append)
        b_task = asyncio.create_task(b.run())
        await wait_until(lambda: b.view().lease_holder == "a", 5)
        await asyncio.sleep(0.3)  # b is now in its 5 s wait, listening
        await a.stop()
        assert not a.is_leading()
        await a_task
        await wait_until(b.is_leading, 1.0)
        await b.stop()
        await b_task

    run(scenario())
    assert [(e["event"], e["center"], e["term"]) for e in events] == [
        ("leader_acquired", "a", 1),
        ("leader_released", "a", 1),
        ("leader_acquired", "b", 2),
        ("leader_released", "b", 2),
    ]


def test_leader_cut_off_from_postgres_steps_down_within_its_renew_deadline(pg: PgServer, dsn: str) -> None:
    database = dsn.rsplit("/", 1)[1]
    proxy = BlackholeProxy(pg.port)
    order: list[tuple[str, str, int | None]] = []

    def record(event: dict[str, Any]) -> None:
        order.append((event["event"], event["center"], event.get("term")))

    async def scenario() -> None:
        a = Elector(settings(pg.dsn(database, port=proxy.port), "a"), record)
        a_task = asyncio.create_task(a.run())
        await wait_until(a.is_leading, 5)
        b = Elector(settings(dsn, "b"), record)
        b_task = asyncio.create_task(b.run())
        await wait_until(lambda: b.view().lease_holder == "a", 5)
        proxy.blackhole()
        # a's renews now hang; it must give up by its own clock (2 s), before the lease (3 s)
        # lets b in, and keep running as a standby (it does not exit).
        await wait_until(lambda: not a.is_leading(), 2.0 + 0.5)
        assert not a_task.done()
        await wait_until(b.is_leading, 3.0 + 2.0)
        assert b.term == 2 and a.view().role is Role.STANDBY
        await b.stop()
        await a.stop()
        await asyncio.wait_for(asyncio.gather(a_task, b_task), 10)

    try:
        run(scenario())
    finally:
        proxy.close()
    assert order[:3] == [
        ("leader_acquired", "a", 1),
        ("leader_lost", "a", 1),
        ("leader_acquired", "b", 2),
    ]


# -- claims -----------------------------------------------------------------------------------


def test_a_claim_with_a_stale_term_fails(dsn: str) -> None:
    async def scenario() -> None:
        async with await connect(dsn) as conn:
            ttl = timedelta(seconds=30)
            assert (await lease_sql.acquire(conn, "a", ttl)).won
            assert await claim_slots(conn, "a", 1, [claim("j", 0, run_id="a0")]) == {"a0"}
            await expire_now(dsn)
            # Expired but not yet taken: no claim either (the lease must be live).
            assert await claim_slots(conn, "a", 1, [claim("j", 1, run_id="a1")]) == set()
            assert (await lease_sql.acquire(conn, "b", ttl)).lease.term == 2
            assert await claim_slots(conn, "a", 1, [claim("j", 2, run_id="a2")]) == set()
            assert await claim_slots(conn, "a", 2, [claim("j", 2, run_id="a2")]) == set()  # not a's term
            # b cannot re-claim the slot a already claimed, but can claim the others.
            got = await claim_slots(conn, "b", 2, [claim("j", m, run_id=f"b{m}") for m in (0, 1, 2)])
            assert got == {"b1", "b2"}
            rows = await (await conn.execute(
                "SELECT run_id, term, holder FROM cronfile_claims ORDER BY scheduled_at")).fetchall()
            assert rows == [("a0", 1, "a"), ("b1", 2, "b"), ("b2", 2, "b")]
            dispatched = await fetch_records(conn, "run", "j")
            assert [(r["run_id"], r["term"]) for r in dispatched] == [("a0", 1), ("b1", 2), ("b2", 2)]

    run(scenario())


def test_claims_are_unique_per_slot_or_per_slot_and_agent_and_retries_are_idempotent(dsn: str) -> None:
    async def scenario() -> None:
        async with await connect(dsn) as conn:
            assert (await lease_sql.acquire(conn, "a", timedelta(seconds=30))).won
            one = [claim("nightly", 0, run_id="r1")]
            assert await claim_slots(conn, "a", 1, one) == {"r1"}
            assert await claim_slots(conn, "a", 1, one) == {"r1"}  # a retry of the same run
            assert await claim_slots(conn, "a", 1, [claim("nightly", 0, run_id="r2")]) == set()
            fanout = [claim("rotate", 0, target=agent) for agent in ("web1", "web2")]
            assert len(await claim_slots(conn, "a", 1, fanout)) == 2
            assert await claim_slots(conn, "a", 1, [claim("rotate", 0, "web1", run_id="x")]) == set()
            dispatched = await fetch_records(conn, "run")
            assert sorted(r["run_id"] for r in dispatched) == ["r1", "rotate-0-web1", "rotate-0-web2"]

    run(scenario())


def test_a_batch_keeps_every_body_and_slot_exactly_as_given(dsn: str) -> None:
    """The batch travels as one json document: bodies with quotes, backslashes and
    non-ASCII come back unchanged, a manual run's NULL slot never collides, and a slot with
    microseconds is the same instant in PostgreSQL (catch-up compares them)."""
    tricky = 'say "hi" \\ back\\slash, {braces}, \u00e9t\u00e9 \u2603, comma'
    exact = T0 + timedelta(seconds=7, microseconds=123457)

    async def scenario() -> None:
        async with await connect(dsn) as conn:
            assert (await lease_sql.acquire(conn, "a", timedelta(seconds=30))).won
            claims = [
                Claim("quoted", exact, SLOT_TARGET, "q1",
                      {"record": "dispatched", "run_id": "q1", "job": "quoted", "note": tricky}),
                Claim("manual", None, SLOT_TARGET, "m1", {"record": "dispatched", "run_id": "m1"}),
                Claim("manual", None, SLOT_TARGET, "m2", {"record": "dispatched", "run_id": "m2"}),
            ]
            assert await claim_slots(conn, "a", 1, claims) == {"q1", "m1", "m2"}
            [quoted] = await fetch_records(conn, "run", "quoted")
            assert quoted == {"record": "dispatched", "run_id": "q1", "job": "quoted", "note": tricky,
                              "term": 1}
            rows = await (await conn.execute(
                "SELECT run_id, scheduled_at FROM cronfile_claims ORDER BY run_id")).fetchall()
            assert rows == [("m1", None), ("m2", None), ("q1", exact)]

    run(scenario())


def test_postgres_restart_under_load_loses_and_doubles_no_claim(pg: PgServer, dsn: str) -> None:
    """A leader claims one slot every few ms while the server restarts; afterwards every slot
    is claimed exactly once, and exactly the slots the leader was told it won."""
    slots = 400
    restarted = threading.Event()

    async def scenario() -> tuple[set[str], int]:
        elector = Elector(settings(dsn, "a", lease_s=20.0, renew_deadline_s=15.0, renew_interval_s=0.5))
        task = asyncio.create_task(elector.run())
        await wait_until(elector.is_leading, 5)
        claimer = Claimer(dsn, "a")
        won: set[str] = set()
        loop = asyncio.get_running_loop()
        restart = loop.run_in_executor(None, lambda: (pg.restart(), restarted.set()))
        for m in range(slots):
            if m == slots // 4:
                await asyncio.sleep(0)  # the restart is under way by now
            term = elector.term
            assert term == 1
            won |= await claimer.claim(term, [claim("load", m)], elector.is_leading)
            if m < slots // 2 and not restarted.is_set():
                await asyncio.sleep(0.005)
        await restart
        await claimer.close()
        assert elector.is_leading() and elector.term == 1  # the lease row is durable
        await elector.stop()
        await task
        return won, claimer.retries

    won, retries = run(scenario())
    assert restarted.is_set()
    assert retries > 0, "the restart never interrupted a claim: the test proved nothing"
    assert won == {f"load-{m}-slot" for m in range(slots)}
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT scheduled_at) FROM cronfile_claims").fetchone()
        assert rows == (slots, slots)
        per_run = conn.execute(
            "SELECT run_id, count(*) FROM cronfile_records WHERE kind = 'run' GROUP BY run_id"
            " HAVING count(*) <> 1").fetchall()
        assert per_run == []
        assert conn.execute("SELECT count(*) FROM cronfile_records").fetchone() == (slots,)


def test_metrics_of_a_replica_say_whether_it_leads_and_its_term() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from cronfile.center.counters import RunMetrics
    from cronfile.center.metrics import render
    from cronfile.center.port import CenterSnapshot

    def scrape(ha: dict[str, Any] | None) -> dict[str, list[tuple[dict[str, str], float]]]:
        snap = CenterSnapshot(now=0.0, revision={}, last_rejection=None, jobs=(), next_fire={},
                              last_slot={}, last_success={}, running={}, agents=(), recent={}, ha=ha)
        text = render(snap, RunMetrics()).decode()
        return {f.name: [(s.labels, s.value) for s in f.samples]
                for f in text_string_to_metric_families(text)}

    view = {"name": "b", "role": "standby", "term": 7, "lease_holder": "a", "lease_expires_at": None}
    families = scrape(view)
    assert families["cronfile_center_leader"] == [({"center": "b"}, 0.0)]
    assert families["cronfile_center_term"] == [({"center": "b"}, 7.0)]
    assert scrape({**view, "role": "leader"})["cronfile_center_leader"] == [({"center": "b"}, 1.0)]
    assert "cronfile_center_leader" not in scrape(None)  # without --ha: no such series
