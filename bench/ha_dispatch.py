"""Dispatch lateness with ``--ha`` (claims in PostgreSQL) against the JSONL-only center.

    .venv/bin/python bench/ha_dispatch.py [--ns 100,1000] [--repeat 2]

The same burst as bench/center_dispatch.py (N jobs due in the same second; lateness = the
ledger's ``started_at`` - scheduled time), measured in the same run with and without
``--ha`` (one center, leading from the start, on a fresh database per burst; claims are
batched per dispatch chunk, one statement each). Target: p99 with ``--ha`` at most 1.5x the
JSONL store's. Skips (exit 0) when PostgreSQL is not installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from benchlib import percentile  # noqa: E402
from center_dispatch import bench_cronfile  # noqa: E402
from pglib import running_postgres, skip_reason  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="100,1000")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    ok = True
    with running_postgres() as pg, tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.ns.split(",")):
            plain, ha = [], []
            for _ in range(args.repeat):
                plain.append(bench_cronfile(n, Path(tmp)))
                ha.append(bench_cronfile(n, Path(tmp), ("--ha", pg.new_database(), "--name", "bench")))
            complete = all(r["finished"] == n and r["dispatched"] == n and "error" not in r
                           for r in plain + ha)
            p99 = {name: statistics.median(percentile(r["late"], 99) for r in rows)
                   for name, rows in (("jsonl", plain), ("ha", ha))}
            p50 = {name: statistics.median(percentile(r["late"], 50) for r in rows)
                   for name, rows in (("jsonl", plain), ("ha", ha))}
            ratio = p99["ha"] / p99["jsonl"] if p99["jsonl"] > 0 else float("nan")
            ok &= complete  # a missed figure is reported, not a failure: benches are not tests
            print(f"N={n:<5} jsonl p50 {p50['jsonl'] * 1000:7.1f} ms p99 {p99['jsonl'] * 1000:7.1f} ms | "
                  f"--ha p50 {p50['ha'] * 1000:7.1f} ms p99 {p99['ha'] * 1000:7.1f} ms | "
                  f"ratio p99 {ratio:.2f} (target <= 1.5{'' if ratio <= 1.5 else ': MISSED'}) | "
                  f"{'all recorded' if complete else 'RUNS MISSING'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
