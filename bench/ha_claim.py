"""What one ``--ha`` slot claim costs, by how its batch is sent, beside the JSONL fsync.

    .venv/bin/python bench/ha_claim.py [--ns 32,128] [--claims 40]

A dispatch chunk (32 runs first, then 128) is claimed in one statement before its runs
start. Per claim this prints the wall time (the round trip, the server's work and its
commit) and the CPU time of the calling thread: that is the center's event loop, which
spawns nothing while it encodes a claim. Shapes, measured in the same run on one server:

* ``json``: what :func:`cronfile.ha.claims.claim_slots` sends, the batch as one json
  document (``jsonb_to_recordset``), prepared;
* ``arrays``: the earlier shape, five arrays (``unnest(%s::text[], ..., %s::jsonb[])``),
  whose jsonb bodies psycopg escapes in pure Python, quote by quote;
* baseline: the JSONL store's work for the same chunk, one write and one fsync of its
  ``dispatched`` records.

Skips (exit 0) when PostgreSQL is not installed. Not a test: figures, with ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from pglib import running_postgres, skip_reason  # noqa: E402

from cronfile.ha.claims import Claim, claim_slots  # noqa: E402
from cronfile.ha.lease import acquire  # noqa: E402
from cronfile.ha.migrations import migrate  # noqa: E402

ARRAYS = """
WITH lease AS (
    SELECT term, holder FROM cronfile_lease
    WHERE id = 1 AND holder = %(holder)s AND term = %(term)s AND expires_at > now()
    FOR SHARE
),
wanted AS (
    SELECT * FROM unnest(%(jobs)s::text[], %(slots)s::timestamptz[], %(targets)s::text[],
                         %(run_ids)s::text[], %(bodies)s::jsonb[])
        AS w(job, scheduled_at, target, run_id, body)
),
inserted AS (
    INSERT INTO cronfile_claims (job, scheduled_at, target, run_id, term, holder)
    SELECT w.job, w.scheduled_at, w.target, w.run_id, lease.term, lease.holder
    FROM wanted w CROSS JOIN lease
    ON CONFLICT DO NOTHING
    RETURNING run_id
),
recorded AS (
    INSERT INTO cronfile_records (kind, ts, run_id, job, center, term, body)
    SELECT 'run', now(), w.run_id, w.job, %(holder)s, %(term)s,
           w.body || jsonb_build_object('term', %(term)s::bigint)
    FROM wanted w JOIN inserted i USING (run_id)
    RETURNING run_id
)
SELECT run_id FROM recorded
UNION
SELECT c.run_id FROM cronfile_claims c JOIN wanted w USING (run_id) CROSS JOIN lease
"""

HOLDER = "bench"


async def claim_as_arrays(conn: psycopg.AsyncConnection[Any], term: int, claims: list[Claim]) -> set[str]:
    params = {
        "holder": HOLDER, "term": term,
        "jobs": [c.job for c in claims], "slots": [c.scheduled_at for c in claims],
        "targets": [c.target for c in claims], "run_ids": [c.run_id for c in claims],
        "bodies": [json.dumps(c.dispatched) for c in claims],
    }
    cur = await conn.execute(ARRAYS, params)
    return {row[0] for row in await cur.fetchall()}


async def claim_as_json(conn: psycopg.AsyncConnection[Any], term: int, claims: list[Claim]) -> set[str]:
    return await claim_slots(conn, HOLDER, term, claims)


def chunk(tag: str, k: int, n: int) -> list[Claim]:
    """A chunk of n runs of one slot, each with a dispatched record of the usual size."""
    slot = datetime.fromtimestamp(1_800_000_000 + k, UTC)
    out = []
    for i in range(n):
        run_id = f"{tag}-j{i:05d}-{k}"
        body = {"v": 1, "record": "dispatched", "run_id": run_id, "job": f"j{i:05d}",
                "agent": "local", "transport": "local", "scheduled_at": slot.isoformat(),
                "attempt": 1, "revision": "0123456789abcdef0123456789abcdef01234567",
                "center": HOLDER, "ts": slot.isoformat(), "term": 1}
        out.append(Claim(f"{tag}-j{i:05d}", slot, "", run_id, body))
    return out


async def measure(conn: psycopg.AsyncConnection[Any], term: int, tag: str, n: int, count: int,
                  shape: Callable[[psycopg.AsyncConnection[Any], int, list[Claim]], Awaitable[set[str]]]
                  ) -> tuple[float, float]:
    """Median wall and calling-thread CPU seconds per claim (after 5 uncounted ones)."""
    walls, cpus = [], []
    for k in range(count + 5):
        claims = chunk(tag, k, n)
        w0, c0 = time.perf_counter(), time.thread_time()
        won = await shape(conn, term, claims)
        if k >= 5:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.thread_time() - c0)
        assert len(won) == n, f"{tag}: {len(won)} of {n} claimed"
    return statistics.median(walls), statistics.median(cpus)


def fsync_cost(directory: str, n: int, count: int) -> float:
    """Median seconds for one write + fsync of n dispatched records (the JSONL store)."""
    line = (json.dumps(chunk("f", 0, 1)[0].dispatched) + "\n").encode()
    times = []
    with open(os.path.join(directory, "runs.jsonl"), "ab") as fh:
        for _ in range(count):
            t0 = time.perf_counter()
            fh.write(line * n)
            fh.flush()
            os.fsync(fh.fileno())
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def run(dsn: str, ns: list[int], count: int) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        lease = await acquire(conn, HOLDER, timedelta(hours=1))
        assert lease.won
        term = lease.lease.term
        with tempfile.TemporaryDirectory() as tmp:
            for n in ns:
                # alternate the shapes, twice each, so a passing load hits both
                rows: dict[str, list[tuple[float, float]]] = {"arrays": [], "json": []}
                for rnd in range(2):
                    for name, shape in (("arrays", claim_as_arrays), ("json", claim_as_json)):
                        rows[name].append(await measure(conn, term, f"{name}{rnd}n{n}", n, count, shape))
                wall = {s: statistics.median(w for w, _ in r) for s, r in rows.items()}
                cpu = {s: statistics.median(c for _, c in r) for s, r in rows.items()}
                disk = fsync_cost(tmp, n, count)
                print(f"chunk of {n:4}: arrays wall {wall['arrays'] * 1000:6.2f} ms loop CPU "
                      f"{cpu['arrays'] * 1000:6.2f} ms | json wall {wall['json'] * 1000:6.2f} ms loop CPU "
                      f"{cpu['json'] * 1000:6.2f} ms | json/arrays wall {wall['json'] / wall['arrays']:.2f} "
                      f"CPU {cpu['json'] / cpu['arrays']:.2f} | JSONL write+fsync {disk * 1000:5.2f} ms "
                      f"(json claim {wall['json'] / disk:.1f}x it)", flush=True)
    finally:
        await conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="32,128")
    ap.add_argument("--claims", type=int, default=40, help="claims measured per shape and round")
    args = ap.parse_args()
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    with running_postgres() as pg:
        dsn = pg.new_database()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        asyncio.run(run(dsn, [int(x) for x in args.ns.split(",")], args.claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
