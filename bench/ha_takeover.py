"""What a takeover's read from PostgreSQL costs, against the history it has to skip.

    .venv/bin/python bench/ha_takeover.py [--runs 10000,100000] [--repeat 3]

A records table holding R runs spread over the last 6 hours (dispatched, started, finished;
1 in 50 failed and retried, 5 still open), as the old leader left it. Timed, in the same
run: the takeover's read (``read_takeover_ledger`` over a 20 s gap and the 6 h horizon) and
the fold into a ``Recovery``; the baseline is one plain ``SELECT body`` of every run record
in the horizon (what reading the whole history would cost). Printed: medians, the ratio to
the baseline, and how many records the takeover actually read. Skips (exit 0) when
PostgreSQL is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from pglib import running_postgres, skip_reason  # noqa: E402

from cronfile.center.recovery import recover  # noqa: E402
from cronfile.ha.migrations import migrate  # noqa: E402
from cronfile.ha.takeover import read_takeover_ledger  # noqa: E402
from cronfile.state.ledger import fold_runs  # noqa: E402

HOURS_S = 6 * 3600.0


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def history(runs: int, now: float) -> list[tuple[float, str, str, dict[str, Any]]]:
    rows = []
    for i in range(runs):
        slot = now - HOURS_S + i * (HOURS_S - 60) / runs
        job = f"job-{i % 500}"
        run_id = f"{job}-{i}"
        base = {"v": 1, "run_id": run_id, "job": job, "agent": "local", "transport": "local",
                "scheduled_at": iso(slot), "attempt": 1, "revision": {}}
        rows.append((slot, run_id, job, {**base, "record": "dispatched", "term": 1}))
        if i >= runs - 5:
            continue  # still open
        rows.append((slot, run_id, job, {**base, "record": "started", "started_at": iso(slot)}))
        failed = i % 50 == 0
        rows.append((slot + 1, run_id, job, {**base, "record": "finished",
                                             "status": "failed" if failed else "succeeded",
                                             "exit_code": 1 if failed else 0,
                                             "finished_at": iso(slot + 1)}))
        if failed:
            retry = {**base, "run_id": run_id + "-2", "attempt": 2}
            rows.append((slot + 31, retry["run_id"], job, {**retry, "record": "dispatched"}))
            rows.append((slot + 32, retry["run_id"], job, {**retry, "record": "finished",
                                                           "status": "succeeded", "exit_code": 0,
                                                           "finished_at": iso(slot + 32)}))
    return rows


def load(dsn: str, rows: list[tuple[float, str, str, dict[str, Any]]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
        with conn.cursor() as cur, cur.copy(
                "COPY cronfile_records (kind, ts, run_id, job, center, term, body) FROM STDIN") as copy:
            for ts, run_id, job, body in rows:
                copy.write_row(("run", datetime.fromtimestamp(ts, UTC), run_id, job, "a", 1,
                                json.dumps(body)))
        conn.execute("ANALYZE cronfile_records")


async def takeover(dsn: str, now: float) -> tuple[float, int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        began = time.perf_counter()
        found = await read_takeover_ledger(conn, now - 20, now - HOURS_S)
        recovery = recover(fold_runs(found.runs))
        took = time.perf_counter() - began
    assert len(recovery.lost) == 5, len(recovery.lost)
    return took, len(found.runs)


async def whole_history(dsn: str, now: float) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        began = time.perf_counter()
        cur = await conn.execute("SELECT body FROM cronfile_records WHERE kind = 'run' AND ts >= %s",
                                 (datetime.fromtimestamp(now - HOURS_S, UTC),))
        await cur.fetchall()
        return time.perf_counter() - began


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="10000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    with running_postgres() as pg:
        for runs in (int(x) for x in args.runs.split(",")):
            dsn = pg.new_database()
            now = time.time()
            rows = history(runs, now)
            load(dsn, rows)
            ours, base, read = [], [], 0
            for _ in range(args.repeat):  # alternated, so both see the same machine
                took, read = asyncio.run(takeover(dsn, now))
                ours.append(took)
                base.append(asyncio.run(whole_history(dsn, now)))
            t, b = statistics.median(ours), statistics.median(base)
            print(f"runs={runs:<7} records={len(rows):<7} takeover read+recover {t * 1000:8.1f} ms "
                  f"(read {read} records) | whole 6h history {b * 1000:8.1f} ms | "
                  f"ratio {t / b:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
