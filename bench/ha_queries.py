"""Run queries from PostgreSQL (an HA center's ledger of record) against the JSONL ledger,
with the same records in both, measured in the same run.

    .venv/bin/python bench/ha_queries.py [--records 100000] [--repeat 7]

It generates a state directory of past runs (bench/ledger.py's generator: three records per
run, 20 jobs, over 30 days), lets ``cronfile center`` take it over once (segments and a
checkpoint, as on a real host), then copies every record into a fresh PostgreSQL as an HA
center does (each with its JSONL line). For ``runs --job j --limit 20``, ``runs --since/
--until`` (one hour three days back) and ``status`` it prints the time of the query itself
(in process, the median of ``--repeat``) and of the whole command (``cronfile ... --state``
vs ``cronfile ... --ha DSN --state``, best of five), and the ratio PG / JSONL. It checks
that both stores print the same bytes. Skips (exit 0) when PostgreSQL is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchlib import stop_center  # noqa: E402
from ledger import JOB, JOBS, first_applied_after, generate, iso, timed  # noqa: E402
from pglib import running_postgres, skip_reason  # noqa: E402

CRONFILE = [sys.executable, "-m", "cronfile"]
SCHEDULE = "apiVersion: cronfile/v1\njobs:\n" + "".join(
    f"  {name}:\n    schedule: \"*/5 * * * *\"\n    command: \"true\"\n" for name in JOBS)


def take_over(schedules: Path, state: Path) -> None:
    """One center start on the generated directory: it splits the old-format file into
    segments and writes the checkpoint, as the first start of an upgrade does."""
    log = state.parent / "center.log"
    t0 = time.time()
    with open(log, "ab") as out:
        proc = subprocess.Popen([*CRONFILE, "center", "--schedules", str(schedules), "--state",
                                 str(state), "--no-watch"], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 600
        while not first_applied_after(state / "events.jsonl", t0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the center did not start: see {log}")
            time.sleep(0.05)
    finally:
        stop_center(proc, 60)


def copy_to_postgresql(state: Path, dsn: str) -> int:
    """Every record of the ledger, oldest first, into PostgreSQL as a center copies them."""
    import psycopg

    from cronfile.ha.claims import append_records
    from cronfile.ha.migrations import migrate
    from cronfile.state.queries import newest_first_lines

    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)

    async def fill() -> int:
        import json

        count = 0
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for kind, table in (("events", "event"), ("runs", "run")):
                lines = [line.rstrip(b"\n").decode() for line in newest_first_lines(state, kind)]
                lines.reverse()
                for i in range(0, len(lines), 5000):
                    part = lines[i:i + 5000]
                    count += await append_records(conn, "bench", 1, table,
                                                  [json.loads(x) for x in part], part)
            await conn.execute("ANALYZE cronfile_records")
        return count

    return asyncio.run(fill())


def median_time(call: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    from cronfile.ha.queries import PgRunStore
    from cronfile.schedules.nexttimes import parse_time
    from cronfile.state.queries import JsonlRunStore
    from cronfile.state.reports import build_status, query_runs

    with running_postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        schedules, state = root / "schedules", root / "state"
        schedules.mkdir()
        (schedules / "jobs.yaml").write_text(SCHEDULE)
        end = time.time() - 3600
        written = generate(state, args.records // 3, end)
        take_over(schedules, state)
        dsn = pg.new_database()
        copied = copy_to_postgresql(state, dsn)
        print(f"{written} records generated, {copied} copied to PostgreSQL", flush=True)
        since, until = iso(end - 3 * 86400), iso(end - 3 * 86400 + 3600)
        stores = {"jsonl": JsonlRunStore(state), "pg": PgRunStore(dsn)}
        forms: dict[str, tuple[Callable[[Any], Any], list[str]]] = {
            f"runs --job {JOB} --limit 20": (
                lambda s: query_runs(s, JOB, None, None, 20), ["runs", "--job", JOB, "--limit", "20"]),
            "runs --since/--until (1 h, 3 d back)": (
                lambda s: query_runs(s, None, None, since, 0, until),
                ["runs", "--since", since, "--until", until, "--limit", "0"]),
            "status": (lambda s: build_status(state, store=s), ["status", "--format", "json"]),
        }
        assert parse_time(since) < parse_time(until)
        same = True
        for name, (call, argv) in forms.items():
            inproc = {k: median_time(lambda s=s, c=call: c(s), args.repeat) for k, s in stores.items()}
            base = [*CRONFILE, *argv, "--state", str(state)]
            command = {"jsonl": timed(base, 5), "pg": timed([*base, "--ha", dsn], 5)}
            outputs = [subprocess.run(a, capture_output=True).stdout for a in (base, [*base, "--ha", dsn])]
            if name != "status":  # status has "next" (now-dependent) and the center's pid
                same &= outputs[0] == outputs[1]
            print(f"{name:<38} query: jsonl {inproc['jsonl'] * 1000:7.1f} ms, pg "
                  f"{inproc['pg'] * 1000:7.1f} ms, ratio {inproc['pg'] / inproc['jsonl']:5.2f} | "
                  f"command: jsonl {command['jsonl'] * 1000:6.0f} ms, pg {command['pg'] * 1000:6.0f} ms, "
                  f"ratio {command['pg'] / command['jsonl']:5.2f}", flush=True)
        print("runs output: " + ("the same bytes from both stores" if same else "DIFFERS"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
