"""Dispatch lateness of ``cronfile center`` for N jobs due in the same second.

lateness = child start - scheduled time. The child start is the ledger's ``started_at``
(taken right before the spawn); the last few jobs of the burst run
``python -c 'print(time.time())'`` instead of ``/bin/true`` as a sanity check on what the
child itself sees (that one includes Python's own start-up, ~20-40 ms). They are the last
ones dispatched: each such start-up takes 20-40 ms of CPU, which on 2 cores would slow
the rest of the burst (the bare loop spawns only ``/bin/true``).

Beside it, in the same run (2 shared cores, noisy: medians of repeats are printed):

* bare spawn: the same N ``Popen(["/bin/true"])`` from a plain loop; time from loop start to each
  spawn: the physical limit of this machine;
* APScheduler 3.x (BackgroundScheduler, default executor and misfire grace), a CronTrigger at
  the same second, each job doing ``Popen(["/bin/true"])``; misfired/never-run jobs are counted.

Usage: python bench/center_dispatch.py [--quick] [--ns 1,100,1000,10000] [--repeat R] [--features]
[--pool]

``--features`` gives every job ``concurrency: queue``, an ``active`` window around now and
``skip:`` a calendar (whose day and window are not today): the ratios must not move with them.
``--pool`` puts every job in one pool of ``max_running: 100000`` (the cap is never reached:
what is measured is the cost of counting places): the ratios must not move with it either.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from benchlib import parse_iso, percentile, stop_center

PY = sys.executable
CRONFILE = [PY, "-m", "cronfile"]
SANITY_JOBS = 3
JOBS_PER_FILE = 100


def six_field(ts: float) -> str:
    d = datetime.fromtimestamp(ts, UTC)
    return f"{d.second} {d.minute} {d.hour} * * *"


FEATURES: list[str] = []  # extra job lines (--features): the scheduling options in play
POOL: list[str] = []  # the pool's declaration (--pool), in the first file


def write_schedules(root: Path, n: int, slot: float) -> None:
    sched = six_field(slot)
    for f in range(math.ceil(n / JOBS_PER_FILE)):
        lines = ["apiVersion: cronfile/v1"]
        if FEATURES and f == 0:  # one calendar for every job: a day and a window not today
            lines += ["calendars:", "  holidays:", "    dates: [2000-01-01]",
                      '    windows: [{from: "2000-01-02T00:00:00Z", to: "2000-01-03T00:00:00Z"}]']
        if POOL and f == 0:
            lines += POOL
        lines.append("jobs:")
        for k in range(f * JOBS_PER_FILE, min(n, (f + 1) * JOBS_PER_FILE)):
            lines.append(f"  j{k:05d}:")
            lines.append(f'    schedule: "{sched}"')
            lines.append("    timezone: UTC")
            if k >= n - SANITY_JOBS:
                lines.append(f'    command: ["{PY}", "-S", "-c", "import time;print(repr(time.time()))"]')
            else:
                lines.append('    command: ["/bin/true"]')
            lines.append("    timeout: 30s")
            lines.extend(FEATURES)
            if POOL:
                lines.append("    pool: everything")
        (root / f"f{f:04d}.yaml").write_text("\n".join(lines) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        with path.open() as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def count_finished(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(b'"record": "finished"') + data.count(b'"record":"finished"')


def wait_event(events: Path, name: str, timeout: float, after: int = 0) -> float | None:
    """Wall time at which the (after+1)-th ``name`` event was seen (polling), or None."""
    deadline = time.time() + timeout
    needle = f'"{name}"'.encode()
    while time.time() < deadline:
        try:
            if events.read_bytes().count(needle) > after:
                return time.time()
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    return None


def bench_cronfile(n: int, tmp: Path, extra: tuple[str, ...] = ()) -> dict:
    """One burst of ``n`` jobs; ``extra`` center options (bench/ha_dispatch.py adds --ha)."""
    root = tmp / f"cf{n}"
    shutil.rmtree(root, ignore_errors=True)
    sched, state = root / "schedules", root / "state"
    sched.mkdir(parents=True)
    # Start-up with N jobs takes a while on 2 cores: give it a margin that grows with N.
    margin = 3.0 + n * 0.0008
    slot = math.ceil(time.time() + margin)
    write_schedules(sched, n, slot)
    log = (root / "center.log").open("wb")
    proc = subprocess.Popen([*CRONFILE, "center", "--schedules", str(sched), "--state", str(state),
                             "--no-watch", *extra], stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(root))
    res: dict = {"n": n, "slot": slot}
    try:
        applied = wait_event(state / "events.jsonl", "revision_applied", timeout=slot - time.time() + 30)
        res["applied_before_slot_s"] = None if applied is None else slot - applied
        if applied is None or applied > slot:
            late = "never" if applied is None else f"{applied - slot:+.2f}s"
            res["error"] = f"center not ready before the slot (ready: {late})"
        runs = state / "runs.jsonl"
        deadline = slot + 60 + n * 0.01
        while time.time() < deadline and count_finished(runs) < n:
            time.sleep(0.1)
    finally:
        stop_center(proc, 30)
        log.close()
    records = read_jsonl(state / "runs.jsonl")
    started = {}
    finished = {}
    dispatched = set()
    for r in records:
        if r.get("record") == "dispatched":
            dispatched.add(r["run_id"])
        elif r.get("record") == "started":
            started[r["run_id"]] = r
        elif r.get("record") == "finished":
            finished[r["run_id"]] = r
    late = []
    sanity = []
    for rid, r in finished.items():
        s = parse_iso(r.get("started_at")) or parse_iso(started.get(rid, {}).get("started_at"))
        sched_at = parse_iso(r.get("scheduled_at"))
        if s is not None and sched_at is not None:
            late.append(s - sched_at)
        if r.get("job", "") >= f"j{n - SANITY_JOBS:05d}" and r.get("status") == "succeeded":
            try:
                child = float(r.get("output_tail", "").strip())
                sanity.append((child - sched_at, child - s))
            except ValueError:
                pass
    statuses: dict[str, int] = {}
    for r in finished.values():
        statuses[r.get("status")] = statuses.get(r.get("status"), 0) + 1
    reasons = sorted({str(r.get("reason")) for r in finished.values()
                      if r.get("status") != "succeeded"})
    res.update(reasons=reasons[:3], late=late, dispatched=len(dispatched), started=len(started),
               finished=len(finished), statuses=statuses, sanity=sanity)
    shutil.rmtree(root, ignore_errors=True)
    return res


def bench_bare(n: int) -> list[float]:
    procs = []
    t0 = time.time()
    late = []
    for _ in range(n):
        late.append(time.time() - t0)
        procs.append(subprocess.Popen(["/bin/true"]))
    for p in procs:
        p.wait()
    return late


def bench_apscheduler(n: int) -> dict:
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    late: list[float] = []
    procs: list[subprocess.Popen] = []
    lock = threading.Lock()
    counts = {"executed": 0, "missed": 0, "error": 0}
    done = threading.Event()
    margin = 2.0 + n * 0.0005
    slot = math.ceil(time.time() + margin)
    d = datetime.fromtimestamp(slot, UTC)

    def job(scheduled: float) -> None:
        t = time.time()
        p = subprocess.Popen(["/bin/true"])
        with lock:
            late.append(t - scheduled)
            procs.append(p)

    def listener(event) -> None:
        with lock:
            if event.code == EVENT_JOB_EXECUTED:
                counts["executed"] += 1
            elif event.code == EVENT_JOB_MISSED:
                counts["missed"] += 1
            else:
                counts["error"] += 1
            if sum(counts.values()) >= n:
                done.set()

    sched = BackgroundScheduler(timezone="UTC")
    sched.add_listener(listener, EVENT_JOB_EXECUTED | EVENT_JOB_MISSED | EVENT_JOB_ERROR)
    trig = CronTrigger(second=d.second, minute=d.minute, hour=d.hour, timezone="UTC")
    for i in range(n):
        sched.add_job(job, trig, args=(float(slot),), id=f"j{i}")
    sched.start()
    ready_before = slot - time.time()
    done.wait(timeout=max(slot - time.time(), 0) + 60 + n * 0.01)
    sched.shutdown(wait=True)
    for p in procs:
        p.wait()
    return {"late": late, "dropped": n - counts["executed"], "missed": counts["missed"],
            "ready_before_slot_s": ready_before}


def fmt(x: float) -> str:
    return f"{x:.3f}s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 1, 100, 1000; one repeat")
    ap.add_argument("--ns", help="comma-separated N values")
    ap.add_argument("--repeat", type=int, help="repeats per N (medians are printed)")
    ap.add_argument("--features", action="store_true",
                    help="every job with concurrency: queue, an active window around now and a calendar")
    ap.add_argument("--pool", action="store_true",
                    help="every job in one pool of max_running: 100000")
    args = ap.parse_args()
    if args.pool:
        POOL.extend(["pools:", "  everything: {max_running: 100000}"])
    if args.features:
        since, until = (datetime.fromtimestamp(time.time() + d, UTC).isoformat() for d in (-86400, 86400))
        FEATURES.extend(["    concurrency: queue", f'    active: {{from: "{since}", until: "{until}"}}',
                         "    skip: [holidays]"])
    ns = [int(x) for x in args.ns.split(",")] if args.ns else ([1, 100, 1000] if args.quick
                                                               else [1, 100, 1000, 10000])
    repeat = args.repeat or (1 if args.quick else 2)
    tmp = Path(tempfile.mkdtemp(prefix="cf-dispatch-"))
    t_start = time.time()
    ok = True
    try:
        for n in ns:
            rows = {"cf": [], "bare": [], "aps": []}
            for _ in range(repeat if n < 10000 else 1):
                cf = bench_cronfile(n, tmp)
                rows["cf"].append(cf)
                rows["bare"].append(bench_bare(n))
                rows["aps"].append(bench_apscheduler(n))
            med = statistics.median
            c_p50 = med(percentile(r["late"], 50) for r in rows["cf"])
            c_p99 = med(percentile(r["late"], 99) for r in rows["cf"])
            c_max = med(max(r["late"] or [float("nan")]) for r in rows["cf"])
            b_p99 = med(percentile(b, 99) for b in rows["bare"])
            b_max = med(max(b) for b in rows["bare"])
            a_p99 = med(percentile(a["late"], 99) for a in rows["aps"])
            a_drop = max(a["dropped"] for a in rows["aps"])
            ratio = f"{c_p99 / b_p99:.2f}" if b_p99 > 0.001 else "n/a (bare ~0)"
            print(f"N={n:<6} cronfile p50 {fmt(c_p50)} p99 {fmt(c_p99)} max {fmt(c_max)} | "
                  f"bare spawn p99 {fmt(b_p99)} max {fmt(b_max)} | ratio p99 {ratio} | "
                  f"apscheduler p99 {fmt(a_p99)} dropped {a_drop}", flush=True)
            for r in rows["cf"]:
                # "recorded": every slot has its dispatched and finished record (none silently
                # dropped); a run refused at spawn is recorded failed, with no started record.
                complete = r["finished"] == n and r["dispatched"] == n
                ok &= complete and "error" not in r and r["statuses"].get("succeeded") == n
                extra = f" ERROR: {r['error']}" if "error" in r else ""
                print(f"         ledger: dispatched {r['dispatched']} started {r['started']} "
                      f"finished {r['finished']} of {n} {r['statuses']} "
                      f"{'all recorded' if complete else 'RUNS MISSING'}; "
                      f"ready {r['applied_before_slot_s']:.2f}s "
                      f"before the slot{extra}", flush=True)
                if r["reasons"]:
                    print(f"         not succeeded, reasons: {r['reasons']}", flush=True)
                if r["sanity"]:
                    print("         sanity (python child's own clock): child-scheduled "
                          + ", ".join(f"{a:.3f}s" for a, _ in r["sanity"])
                          + "; child-ledger started_at "
                          + ", ".join(f"{b:.3f}s" for _, b in r["sanity"]), flush=True)
            for a in rows["aps"]:
                print(f"         apscheduler: executed {n - a['dropped']} missed {a['missed']} "
                      f"p50 {fmt(percentile(a['late'], 50))} max {fmt(max(a['late'] or [float('nan')]))}",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.time() - t_start:.0f}s; every run recorded and succeeded: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
