"""What the scheduling options cost the scheduler itself, in process (no spawns: the
dispatch bench on 2 shared cores is too noisy to see a few percent).

10,000 jobs due every second; ticks of 10,000 due jobs, measured for plain jobs (the
baseline) and, in the same run, for jobs with ``concurrency: queue``, an ``active`` window
around now and a calendar to ``skip`` (a date and a window that are not today). Prints the
best of the repeats (and the medians), the ratio features / plain and the difference per
slot, to set beside what a dispatched run costs (``bench/center_dispatch.py --features``).

Run: ``.venv/bin/python bench/scheduler_features.py [--jobs N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

from cronfile.center.scheduler import Scheduler
from cronfile.schedules.model import Active, Calendar, Concurrency, Job

T0 = 1_800_000_000.0
TICKS = 5


def jobs(n: int, features: bool) -> list[Job]:
    extra: dict[str, object] = {}
    if features:
        extra = {"concurrency": Concurrency.QUEUE, "active": Active(T0 - 86400, T0 + 86400),
                 "skip": (Calendar("holidays", ("2000-01-01",), ((946771200.0, 946857600.0),)),)}
    return [Job(name=f"j{i:05d}", command="true", schedules=("*/1 * * * * *",),
                **extra) for i in range(n)]  # type: ignore[arg-type]


def ticks(batch: list[Job]) -> float:
    sched = Scheduler()
    for job in batch:
        sched.set_job(job, T0)
    gc.collect()
    gc.disable()  # a collection landing in one variant's ticks and not the other's is noise
    try:
        start = time.perf_counter()
        for k in range(1, TICKS + 1):
            assert len(sched.tick(T0 + k)) == len(batch)
        return time.perf_counter() - start
    finally:
        gc.enable()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    plain, featured = jobs(args.jobs, False), jobs(args.jobs, True)
    ticks(plain), ticks(featured)  # warm the caches of both
    base, feat = [], []
    for _ in range(args.repeat):  # interleaved, so load on the machine hits both alike
        base.append(ticks(plain))
        feat.append(ticks(featured))
    # the fastest of the repeats: on a shared machine, the others measure the neighbours
    b, f = min(base), min(feat)
    per = args.jobs * TICKS
    print(f"{TICKS} ticks of {args.jobs} due jobs (best of {args.repeat}; medians "
          f"{statistics.median(base) * 1e3:.0f} / {statistics.median(feat) * 1e3:.0f} ms)")
    print(f"  plain jobs                       {b * 1e3:8.1f} ms  ({b / per * 1e6:.2f} us/slot)")
    print(f"  queue + active + calendar skip   {f * 1e3:8.1f} ms  ({f / per * 1e6:.2f} us/slot)")
    print(f"  ratio features / plain           {f / b:8.3f}   "
          f"({(f - b) / per * 1e6:+.2f} us per slot; a spawn costs ~1000 us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
